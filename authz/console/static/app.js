// The console's router: every page is /console/..., the workspace is in the path
// (/console/w/<workspace>/keys), and the failure cases of the product docs are pages.
import * as api from './api.js';
import { h, show } from './dom.js';
import { keysPage } from './keys.js';
import { observabilityPage } from './observability.js';

const main = document.getElementById('main');
const top = document.getElementById('top');

const SIGN_IN_ERRORS = {
  unsupported_provider: [
    'Unsupported sign-in provider',
    'This deployment does not accept that sign-in provider. Sign in with one of the providers below.',
  ],
  session_expired: ['Your session expired', 'For your safety you were signed out. Sign in again to continue.'],
  signin_failed: ['Sign-in failed', 'The sign-in could not be completed. Try again.'],
  provider_unavailable: [
    'Sign-in provider unavailable',
    'The sign-in provider could not be reached. Try again in a moment.',
  ],
};

const PAGES = { keys: ['API keys', keysPage], observability: ['Observability', observabilityPage] };

export function go(path) {
  window.history.pushState({}, '', path);
  route();
}

async function signInPage(error) {
  show(top, h('div', { class: 'brand' }, 'Token Factory'));
  const list = await api.providers();
  const problem = SIGN_IN_ERRORS[error];
  show(
    main,
    h(
      'section',
      { class: 'card narrow', id: 'signin' },
      problem ? h('div', { class: 'notice error', role: 'alert' }, h('h2', {}, problem[0]), h('p', {}, problem[1])) : null,
      h('h1', {}, 'Sign in to Token Factory'),
      list.length === 0 ? h('p', {}, 'No sign-in provider is configured for the console.') : null,
      h(
        'ul',
        { class: 'providers' },
        list.map((p) =>
          h('li', {}, h('a', { class: 'button', href: `/console/auth/login?provider=${encodeURIComponent(p.id)}` }, `Sign in with ${p.name}`)),
        ),
      ),
    ),
  );
}

function header(session, workspace, page) {
  const select = h(
    'select',
    {
      id: 'workspace',
      'aria-label': 'Workspace',
      onchange: (event) => go(`/console/w/${encodeURIComponent(event.target.value)}/${page}`),
    },
    session.workspaces.map((id) => h('option', { value: id, selected: id === workspace }, id)),
  );
  const nav = Object.entries(PAGES).map(([name, [title]]) =>
    h('a', {
      href: `/console/w/${encodeURIComponent(workspace)}/${name}`,
      class: name === page ? 'active' : '',
      'aria-current': name === page ? 'page' : false,
      onclick: (event) => {
        event.preventDefault();
        go(event.currentTarget.getAttribute('href'));
      },
    }, title),
  );
  show(
    top,
    h('div', { class: 'brand' }, 'Token Factory'),
    h('label', { class: 'workspace' }, 'Workspace ', select),
    h('nav', {}, nav),
    h('span', { class: 'who' }, session.subject),
    signOutButton(),
  );
}

function signOutButton() {
  return h('button', {
    type: 'button',
    class: 'quiet',
    id: 'signout',
    onclick: async () => {
      await api.signOut().catch(() => {});
      window.location.assign('/console/signin');
    },
  }, 'Sign out');
}

export function forbiddenPage(session, detail) {
  show(top, h('div', { class: 'brand' }, 'Token Factory'), h('span', { class: 'who' }, session ? session.subject : ''), session ? signOutButton() : null);
  show(
    main,
    h(
      'section',
      { class: 'card narrow', id: 'forbidden' },
      h('h1', {}, '403: no workspace that can manage API keys'),
      h('p', {}, 'You are signed in, but without a workspace context that can manage API keys. Ask a workspace owner for the permission to manage keys, or sign out and sign in with another account.'),
      detail ? h('p', { class: 'muted' }, detail) : null,
    ),
  );
}

export function failed(error, session) {
  if (error instanceof api.ApiError && error.status === 401) {
    window.location.assign(error.error === 'session_expired' ? '/console/signin?error=session_expired' : '/console/signin');
    return;
  }
  if (error instanceof api.ApiError && error.status === 403) {
    forbiddenPage(session, error.message);
    return;
  }
  show(main, h('div', { class: 'notice error', role: 'alert' }, error.message || String(error)));
}

async function route() {
  const path = window.location.pathname;
  const params = new URLSearchParams(window.location.search);
  if (path === '/console/signin') {
    await signInPage(params.get('error'));
    return;
  }
  let session;
  try {
    session = await api.session();
  } catch (error) {
    failed(error);
    return;
  }
  const usable = session.may_manage_keys ? session.workspaces : [];
  const match = path.match(/^\/console\/w\/([^/]+)\/([a-z]+)$/);
  if (!match) {
    if (usable.length === 0) forbiddenPage(session);
    else go(`/console/w/${encodeURIComponent(usable[0])}/keys`);
    return;
  }
  const workspace = decodeURIComponent(match[1]);
  const page = PAGES[match[2]] ? match[2] : 'keys';
  if (!usable.includes(workspace)) {
    forbiddenPage(session);
    return;
  }
  header(session, workspace, page);
  document.title = `${PAGES[page][0]} · ${workspace} · Token Factory`;
  try {
    await PAGES[page][1](main, { workspace, session, params });
  } catch (error) {
    failed(error, session);
  }
}

window.addEventListener('popstate', route);
route();
