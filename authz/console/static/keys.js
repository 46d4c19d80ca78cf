// API keys: list, Label + Generate, the secret shown once with Copy, Revoke and Rotate.
import * as api from './api.js';
import { h, number, show, when } from './dom.js';

const LIMIT_MESSAGE = 'Key limit reached: revoke an unused key before generating a replacement.';
const GRACE = [
  ['', 'Keep the old key until I revoke it'],
  ['1', '1 hour'],
  ['24', '24 hours'],
  ['168', '7 days'],
];

function status(key) {
  if (key.revoked_at) return ['revoked', `Revoked ${when(key.revoked_at)}`];
  if (!key.active) return ['expired', `Expired ${when(key.expires_at)}`];
  if (key.expires_at) return ['grace', `Active until ${when(key.expires_at)}`];
  return ['active', 'Active'];
}

function secretPanel(title, created, onClose) {
  const copied = h('span', { class: 'muted', role: 'status' });
  return h(
    'section',
    { class: 'card secret', id: 'secret', 'aria-live': 'polite' },
    h('h2', {}, title),
    h('p', { class: 'warning' }, 'Copy this key now. It will not be shown again: after you close or reload this page, only its mask remains.'),
    h('code', { id: 'secret-value' }, created.secret),
    h('div', { class: 'actions' },
      h('button', {
        type: 'button',
        onclick: async () => {
          await navigator.clipboard.writeText(created.secret);
          copied.textContent = 'Copied';
        },
      }, 'Copy'),
      copied,
      h('button', { type: 'button', class: 'quiet', onclick: onClose }, 'Done')),
  );
}

function confirmDialog(title, body, confirmLabel, extra, onConfirm) {
  const dialog = h(
    'dialog',
    { class: 'card' },
    h('form', { method: 'dialog' },
      h('h2', {}, title),
      body.map((line) => h('p', {}, line)),
      extra,
      h('div', { class: 'actions' },
        h('button', { value: 'confirm', class: 'danger' }, confirmLabel),
        h('button', { value: 'cancel', class: 'quiet' }, 'Cancel'))),
  );
  dialog.addEventListener('close', async () => {
    dialog.remove();
    if (dialog.returnValue === 'confirm') await onConfirm();
  });
  document.body.append(dialog);
  dialog.showModal();
}

export async function keysPage(main, { workspace }) {
  const data = await api.keys(workspace);
  const { keys } = data;
  const limits = data.workspace;
  const atLimit = Number(limits.active_keys) >= Number(limits.key_limit);
  const notice = h('div', { id: 'notice', role: 'status' });
  const secretSlot = h('div', { id: 'secret-slot' });

  const refresh = () => keysPage(main, { workspace });
  const fail = (error) => show(notice, h('div', { class: 'notice error', role: 'alert' }, error.message));

  const label = h('input', { id: 'label', name: 'label', maxlength: 128, required: true, placeholder: 'prod-payments-worker', autocomplete: 'off' });
  const form = h(
    'form',
    {
      class: 'generate',
      onsubmit: async (event) => {
        event.preventDefault();
        try {
          const created = await api.generate(workspace, label.value);
          await keysPage(main, { workspace });
          revealOnce(`Key "${created.key.label}" generated`, created);
        } catch (error) {
          fail(error);
        }
      },
    },
    h('label', { for: 'label' }, 'Label'),
    label,
    h('button', { type: 'submit', id: 'generate', disabled: atLimit }, 'Generate'),
  );

  const rows = keys.map((key) => {
    const [state, text] = status(key);
    const named = `${key.label} (${key.mask})`;
    const actions = key.active
      ? [
          h('button', {
            type: 'button',
            class: 'quiet',
            onclick: () => {
              const grace = h('select', { name: 'grace' }, GRACE.map(([v, t]) => h('option', { value: v }, t)));
              confirmDialog(
                `Rotate ${named}?`,
                ['A replacement key is generated, labelled with the workload and today\'s date. Deploy it, check Observability, then revoke the old key.'],
                'Rotate',
                h('label', {}, 'Old key keeps working: ', grace),
                async () => {
                  try {
                    const rotated = await api.rotate(workspace, key.id, grace.value ? Number(grace.value) : null);
                    await keysPage(main, { workspace });
                    revealOnce(`Replacement "${rotated.replacement.label}" generated`, { ...rotated, key: rotated.replacement });
                  } catch (error) {
                    fail(error);
                  }
                },
              );
            },
          }, 'Rotate'),
          h('button', {
            type: 'button',
            class: 'danger',
            onclick: () => {
              const leaked = h('input', { type: 'checkbox', name: 'leaked' });
              confirmDialog(
                `Revoke ${named}?`,
                [`Requests with ${key.label} (${key.mask}) will be refused within a second. This cannot be undone.`],
                'Revoke',
                h('label', {}, leaked, ' This key leaked (recorded as an incident)'),
                async () => {
                  try {
                    await api.revoke(workspace, key.id, leaked.checked);
                    await refresh();
                  } catch (error) {
                    fail(error);
                  }
                },
              );
            },
          }, 'Revoke'),
        ]
      : [];
    return h('tr', { 'data-key': key.id, class: state },
      h('td', { class: 'label' }, key.label),
      h('td', {}, h('code', {}, key.mask)),
      h('td', {}, when(key.created_at), key.created_by ? h('div', { class: 'muted by' }, `by ${key.created_by}`) : null),
      h('td', {}, when(key.last_used_at)),
      h('td', { class: 'num' }, number(key.requests_24h)),
      h('td', {}, h('span', { class: `status ${state}` }, text)),
      h('td', { class: 'actions' }, actions));
  });

  show(
    main,
    h('div', { class: 'title' },
      h('h1', {}, 'API keys'),
      h('span', { class: 'context' }, `Workspace ${workspace}`),
      h('span', { id: 'count', class: atLimit ? 'count full' : 'count' }, `${limits.active_keys} of ${limits.key_limit} keys`)),
    notice,
    secretSlot,
    h('section', { class: 'card' },
      form,
      atLimit ? h('p', { class: 'notice warn', id: 'limit' }, LIMIT_MESSAGE) : null),
    h('section', { class: 'card' },
      keys.length === 0
        ? h('p', { class: 'muted' }, 'No keys yet. Enter a Label and click Generate.')
        : h('table', { id: 'keys' },
            h('thead', {}, h('tr', {}, ['Label', 'Key', 'Created', 'Last used', 'Requests (24 h)', 'Status', ''].map((t) => h('th', {}, t)))),
            h('tbody', {}, rows))),
  );
}

// The secret lives only in this page's memory: shown once, above the refreshed list.
function revealOnce(title, created) {
  const slot = main.children[2];
  show(slot, secretPanel(title, created, () => show(slot)));
}
