// A development OpenID Provider: the certified `oidc-provider` package, configured for the
// console's sign-in. Used by the browser tests and by `make run`. DEVELOPMENT ONLY: its
// sign-in page accepts any user name without a password.
//
//   node tests/support/oidc/provider.mjs   (configured by the environment below)
//
// OIDC_PORT          port on 127.0.0.1 (0 = any free port; the chosen one is printed)
// OIDC_CLIENT        {"client_id", "client_secret", "redirect_uris": [...]}
// OIDC_ACCOUNTS      {"<user name>": {"workspaces": [...], "permissions": "keys:manage"}}
// OIDC_AUDIENCE      the access tokens' audience (the issuer entry's "audience")
//
// Access tokens are RS256 JWTs (resource indicators) carrying the account's `workspaces` and
// `permissions` claims, which is what the key API verifies. Prints `listening <issuer>`.
import { generateKeyPairSync } from 'node:crypto';
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

const client = JSON.parse(process.env.OIDC_CLIENT);
const accounts = JSON.parse(process.env.OIDC_ACCOUNTS || '{}');
const audience = process.env.OIDC_AUDIENCE || 'oais-keys';
const resource = 'urn:oais:keys';
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'dev-1', alg: 'RS256', use: 'sig' };

const server = createServer();
await new Promise((resolve) => server.listen(Number(process.env.OIDC_PORT || 0), '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [{
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...client,
  }],
  jwks: { keys: [jwk] },
  cookies: { keys: [jwk.d.slice(0, 32)] },
  scopes: ['openid', 'keys'],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
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
provider.proxy = false;
server.on('request', provider.callback());
console.log(`listening ${issuer}`);
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
