// The console's own JSON endpoints. The session cookie is HttpOnly: this code never sees a
// token; it only holds the session's CSRF token, sent with every state change.

let csrf = '';

export class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.error = body.error || '';
  }
}

async function call(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') {
    headers['Content-Type'] = 'application/json';
    headers['X-CSRF-Token'] = csrf;
  }
  const reply = await fetch(`/console/${path}`, {
    method,
    headers,
    credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await reply.json().catch(() => ({}));
  if (!reply.ok) throw new ApiError(reply.status, data);
  return data;
}

export async function session() {
  const found = await call('GET', 'api/session');
  csrf = found.csrf_token;
  return found;
}

export const providers = () => call('GET', 'api/providers');
export const signOut = () => call('POST', 'auth/logout', {});
const ws = (id) => `api/w/${encodeURIComponent(id)}`;
export const keys = (id) => call('GET', `${ws(id)}/keys`);
export const generate = (id, label) => call('POST', `${ws(id)}/keys`, { label });
export const revoke = (id, key, leaked) =>
  call('POST', `${ws(id)}/keys/${encodeURIComponent(key)}/revoke`, { leaked });
export const rotate = (id, key, graceHours) =>
  call('POST', `${ws(id)}/keys/${encodeURIComponent(key)}/rotate`, { grace_hours: graceHours });
export const usage = (id, range) =>
  call('GET', `${ws(id)}/usage?range=${encodeURIComponent(range)}`);
