// Observability: the workspace's traffic by hour (24 h, 7 days, this month), per key, and the
// month so far against the token quota and the spend cap, from the usage ledger.
import * as api from './api.js';
import { h, number, show, when } from './dom.js';
import { barChart, meter } from './chart.js';

const RANGES = [['24h', 'Last 24 h'], ['7d', 'Last 7 days'], ['month', 'This month']];
const ACTIONS = { 'key.create': 'created', 'key.rotate': 'rotated', 'key.revoke': 'revoked' };
const usd = (n) => `$${Number(n || 0).toFixed(2)}`;

function sum(hours, field) {
  return hours.reduce((total, point) => total + Number(point[field] || 0), 0);
}

export async function observabilityPage(main, { workspace, params }) {
  const range = RANGES.some(([r]) => r === params.get('range')) ? params.get('range') : '24h';
  const data = await api.usage(workspace, range);
  const { hours } = data;
  const limits = data.workspace;
  const tiles = [
    ['Requests', sum(hours, 'requests')],
    ['Prompt tokens', sum(hours, 'prompt_tokens')],
    ['Completion tokens', sum(hours, 'completion_tokens')],
    ['4xx', sum(hours, 'errors_4xx')],
    ['5xx', sum(hours, 'errors_5xx')],
  ];
  const perKey = Object.entries(data.per_key).sort((a, b) => b[1].requests - a[1].requests);
  show(
    main,
    h('div', { class: 'title' },
      h('h1', {}, 'Observability'),
      h('span', { class: 'context' }, `Workspace ${workspace}`),
      h('nav', { class: 'ranges' }, RANGES.map(([r, text]) =>
        h('a', { href: `?range=${r}`, class: r === range ? 'active' : '', 'aria-current': r === range ? 'page' : false }, text)))),
    h('section', { class: 'tiles' }, tiles.map(([name, value]) =>
      h('div', { class: 'tile', 'data-tile': name }, h('div', { class: 'tile-value' }, number(value)), h('div', { class: 'tile-name' }, name)))),
    h('section', { class: 'card' },
      barChart({ title: 'Requests per hour', hours, series: [{ field: 'requests', name: 'requests', className: 's1' }] }),
      barChart({ title: 'Tokens per hour', hours, series: [
        { field: 'prompt_tokens', name: 'prompt', className: 's1' },
        { field: 'completion_tokens', name: 'completion', className: 's2' },
      ] }),
      barChart({ title: 'Errors per hour', hours, series: [
        { field: 'errors_4xx', name: '4xx', className: 's3' },
        { field: 'errors_5xx', name: '5xx', className: 's4' },
      ] })),
    h('section', { class: 'card' },
      h('h2', {}, 'This month'),
      meter({ label: 'Tokens against the quota', used: data.month.tokens, limit: limits.monthly_token_quota ? Number(limits.monthly_token_quota) : 0, format: number }),
      meter({ label: 'Spend against the cap', used: data.month.spend_usd, limit: limits.monthly_spend_cap_usd || 0, format: usd })),
    h('section', { class: 'card' },
      h('h2', {}, 'Per key'),
      perKey.length === 0
        ? h('p', { class: 'muted' }, 'No traffic in this range.')
        : h('table', { id: 'per-key' },
            h('thead', {}, h('tr', {}, ['Label', 'Key', 'Requests', 'Tokens', '4xx', '5xx', 'Last traffic'].map((t) => h('th', {}, t)))),
            h('tbody', {}, perKey.map(([id, t]) => {
              const key = data.keys[id] || { label: '(deleted key)', mask: id };
              return h('tr', { 'data-key': id },
                h('td', {}, key.label), h('td', {}, h('code', {}, key.mask)),
                h('td', { class: 'num' }, number(t.requests)),
                h('td', { class: 'num' }, number(t.prompt_tokens + t.completion_tokens)),
                h('td', { class: 'num' }, number(t.errors_4xx)), h('td', { class: 'num' }, number(t.errors_5xx)),
                h('td', {}, when(t.last_hour)));
            })))),
    h('section', { class: 'card' },
      h('h2', {}, 'Audit'),
      data.audit.length === 0
        ? h('p', { class: 'muted' }, 'No changes yet.')
        : h('table', { id: 'audit' },
            h('thead', {}, h('tr', {}, ['When', 'Who', 'What', 'Key', 'Detail'].map((t) => h('th', {}, t)))),
            h('tbody', {}, data.audit.map((entry) => {
              const key = data.keys[entry.key_id];
              return h('tr', {},
                h('td', {}, when(entry.at)),
                h('td', {}, entry.actor_subject, entry.actor_kind === 'operator' ? ' (operator)' : ''),
                h('td', {}, ACTIONS[entry.action] || entry.action),
                h('td', {}, key ? [key.label, ' ', h('code', {}, key.mask)] : ''),
                h('td', { class: 'muted' }, entry.detail));
            })))),
    h('p', { class: 'muted' }, 'Hourly, from the usage ledger (it lags by a few seconds); the audit log shows the newest 200 changes. Latency percentiles and denials by reason are not recorded by the ledger yet.'),
  );
  for (const link of main.querySelectorAll('.ranges a')) {
    link.addEventListener('click', (event) => {
      event.preventDefault();
      window.history.pushState({}, '', link.getAttribute('href'));
      observabilityPage(main, { workspace, params: new URLSearchParams(window.location.search) });
    });
  }
}
