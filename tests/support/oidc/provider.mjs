// A development OpenID Provider: the certified `oidc-provider` package, configured for the
// console's sign-in. Used by the browser tests and by `make run`. DEVELOPMENT ONLY: its
// sign-in page signs in any of the configured accounts with one click, without a password.
//
//   node tests/support/oidc/provider.mjs   (configured by the environment below)
//
// OIDC_PORT          port on 127.0.0.1 (0 = any free port; the chosen one is printed)
// OIDC_CLIENT        {"client_id", "client_secret", "redirect_uris": [...]}
// OIDC_ACCOUNTS      {"<account>": {"workspaces": [...], "permissions": "keys:manage"}}
// OIDC_AUDIENCE      the access tokens' audience (the issuer entry's "audience")
//
// Access tokens are RS256 JWTs (resource indicators) carrying the account's `workspaces` and
// `permissions` claims, which is what the key API verifies. Prints `listening <issuer>`.
import { generateKeyPairSync } from 'node:crypto';
import { createServer } from 'node:http';
import Provider from 'oidc-provider';
// Memory is the point of a development provider (its sign-in page says so); passing the store
// explicitly keeps oidc-provider from warning about it on every `make run`.
import { createMemoryAdapter } from 'oidc-provider/lib/adapters/memory_adapter.js';

const client = JSON.parse(process.env.OIDC_CLIENT);
const accounts = JSON.parse(process.env.OIDC_ACCOUNTS || '{}');
const audience = process.env.OIDC_AUDIENCE || 'oais-keys';
const resource = 'urn:oais:keys';
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'dev-1', alg: 'RS256', use: 'sig' };

const server = createServer();
await new Promise((resolve) => server.listen(Number(process.env.OIDC_PORT || 0), '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const clockTolerance = 15; // oidc-provider's default, which its own memory store would use
const provider = new Provider(issuer, {
  clockTolerance,
  adapter: createMemoryAdapter(clockTolerance),
  clients: [{
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...client,
  }],
  jwks: { keys: [jwk] },
  cookies: { keys: [jwk.d.slice(0, 32)] },
  scopes: ['openid', 'keys'],
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'keys',
        audience,
        accessTokenTTL: Number(process.env.OIDC_TOKEN_TTL_S || 3600),
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  findAccount: (_ctx, id) => ({ accountId: id, claims: () => ({ sub: id }) }),
  extraTokenClaims: (_ctx, token) => {
    const account = accounts[token.accountId] || {};
    return { workspaces: account.workspaces || [], permissions: account.permissions || '' };
  },
  // Consent is implied: one click signs the member in.
  loadExistingGrant: async (ctx) => {
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope([...ctx.oidc.requestParamOIDCScopes].join(' '));
    grant.addResourceScope(resource, 'keys');
    await grant.save();
    return grant;
  },
});
const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// The sign-in page: one button per account, and a banner that says what this provider is.
async function interaction(req, res, uid, submitted) {
  await provider.interactionDetails(req, res);
  if (submitted) {
    let body = '';
    for await (const chunk of req) body += chunk;
    const account = new URLSearchParams(body).get('account');
    if (!Object.hasOwn(accounts, account)) {
      res.writeHead(400).end('unknown account');
      return;
    }
    await provider.interactionFinished(req, res, { login: { accountId: account } }, { mergeWithLastSubmission: false });
    return;
  }
  const buttons = Object.keys(accounts).map((name) =>
    `<p><button type="submit" name="account" value="${escape(name)}">Sign in as ${escape(name)}</button></p>`).join('');
  res.writeHead(200, {
    'content-type': 'text/html; charset=utf-8',
    // No form-action: Chromium applies it to the redirect back to the console too.
    'content-security-policy': "default-src 'none'; style-src 'unsafe-inline'",
  });
  res.end(`<!doctype html><meta charset="utf-8"><title>Development sign-in</title>
<body style="font-family: system-ui; max-width: 32rem; margin: 4rem auto">
<p style="background: #fff8c5; padding: .6rem; border-radius: 6px"><strong>Development identity provider.</strong>
Not for production: it signs in demo accounts without a password.</p>
<h1>Sign in</h1><form method="post" action="/interaction/${escape(uid)}/login">${buttons}</form></body>`);
}

provider.proxy = false;
const callback = provider.callback();
server.on('request', (req, res) => {
  const match = req.url.match(/^\/interaction\/([\w-]+)(\/login)?$/);
  if (!match) return callback(req, res);
  return interaction(req, res, match[1], Boolean(match[2]) && req.method === 'POST').catch((error) => {
    res.writeHead(400).end(escape(error.message));
  });
});
console.log(`listening ${issuer}`);
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
