// Observability: the workspace's traffic by hour (24 h, 7 days, this month), latency p50/p95
// and denials by reason, per key, and the month so far against the token quota and the spend
// cap, from the usage ledger and ConsoleService.GetObservations.
import * as api from './api.js';
import { h, number, show, when } from './dom.js';
import { barChart, lineChart, meter } from './chart.js';

const RANGES = [['24h', 'Last 24 h'], ['7d', 'Last 7 days'], ['month', 'This month']];
const ACTIONS = { 'key.create': 'created', 'key.rotate': 'rotated', 'key.revoke': 'revoked' };
const DENIALS = [
  ['unauthenticated', '401', 's4'],
  ['rate_limit_requests', '429 requests', 's1'],
  ['rate_limit_tokens', '429 tokens', 's2'],
  ['insufficient_quota', 'insufficient_quota', 's3'],
];
const ms = (n) => (n ? `${Number(n).toFixed(n < 10 ? 1 : 0)} ms` : '–');
const denied = (reasons) => DENIALS.reduce((total, [reason]) => total + Number((reasons || {})[reason] || 0), 0);
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
    ['p50 latency', ms(data.latency.p50_ms)],
    ['p95 latency', ms(data.latency.p95_ms)],
    ...DENIALS.map(([reason, name]) => [`Denied ${name}`, data.denials[reason]]),
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
      h('div', { class: 'tile', 'data-tile': name }, h('div', { class: 'tile-value' }, typeof value === 'string' ? value : number(value)), h('div', { class: 'tile-name' }, name)))),
    h('section', { class: 'card' },
      barChart({ title: 'Requests per hour', hours, series: [{ field: 'requests', name: 'requests', className: 's1' }] }),
      barChart({ title: 'Tokens per hour', hours, series: [
        { field: 'prompt_tokens', name: 'prompt', className: 's1' },
        { field: 'completion_tokens', name: 'completion', className: 's2' },
      ] }),
      barChart({ title: 'Errors per hour', hours, series: [
        { field: 'errors_4xx', name: '4xx', className: 's3' },
        { field: 'errors_5xx', name: '5xx', className: 's4' },
      ] }),
      lineChart({ title: 'Latency per hour', unit: 'ms', hours, series: [
        { field: 'p50_ms', name: 'p50', className: 's1' },
        { field: 'p95_ms', name: 'p95', className: 's4' },
      ] }),
      barChart({ title: 'Denials per hour', hours, series: DENIALS.map(([field, name, className]) => ({ field, name, className })) })),
    h('section', { class: 'card' },
      h('h2', {}, 'This month'),
      meter({ label: 'Tokens against the quota', used: data.month.tokens, limit: limits.monthly_token_quota ? Number(limits.monthly_token_quota) : 0, format: number }),
      meter({ label: 'Spend against the cap', used: data.month.spend_usd, limit: limits.monthly_spend_cap_usd || 0, format: usd })),
    h('section', { class: 'card' },
      h('h2', {}, 'Per key'),
      perKey.length === 0
        ? h('p', { class: 'muted' }, 'No traffic in this range.')
        : h('table', { id: 'per-key' },
            h('thead', {}, h('tr', {}, ['Label', 'Key', 'Requests', 'Tokens', '4xx', '5xx', 'p50', 'p95', 'Denied', 'Last traffic'].map((t) => h('th', {}, t)))),
            h('tbody', {}, perKey.map(([id, t]) => {
              const key = data.keys[id] || { label: '(deleted key)', mask: id };
              return h('tr', { 'data-key': id },
                h('td', {}, key.label), h('td', {}, h('code', {}, key.mask)),
                h('td', { class: 'num' }, number(t.requests)),
                h('td', { class: 'num' }, number(t.prompt_tokens + t.completion_tokens)),
                h('td', { class: 'num' }, number(t.errors_4xx)), h('td', { class: 'num' }, number(t.errors_5xx)),
                h('td', { class: 'num', 'data-col': 'p50' }, ms(t.p50_ms)),
                h('td', { class: 'num', 'data-col': 'p95' }, ms(t.p95_ms)),
                h('td', { class: 'num', 'data-col': 'denied', title: DENIALS.map(([r, name]) => `${name}: ${(t.denials || {})[r] || 0}`).join(', ') }, number(denied(t.denials))),
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
    h('p', { class: 'muted' }, 'Hourly, from the usage ledger (it lags by a few seconds); the audit log shows the newest 200 changes. Latency is from the first byte Envoy received to the last byte it sent, for allowed requests, estimated to within about 19 %. A 401 counts here only for a key past its rotation grace period: an unknown or revoked key belongs to no workspace.'),
  );
  for (const link of main.querySelectorAll('.ranges a')) {
    link.addEventListener('click', (event) => {
      event.preventDefault();
      window.history.pushState({}, '', link.getAttribute('href'));
      observabilityPage(main, { workspace, params: new URLSearchParams(window.location.search) });
    });
  }
}
