// Hourly bar charts in plain SVG: one bar group per hour, stacked series, an axis with the
// maximum and the first and last hour. Values are drawn as geometry and text nodes only.
import { h, svg } from './dom.js';

const W = 720;
const H = 160;
const PAD = { left: 48, right: 8, top: 8, bottom: 22 };

export function barChart({ title, hours, series }) {
  const totals = hours.map((point) => series.reduce((sum, s) => sum + Number(point[s.field] || 0), 0));
  const max = Math.max(1, ...totals);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const step = plotW / Math.max(1, hours.length);
  const bars = [];
  hours.forEach((point, i) => {
    let y = PAD.top + plotH;
    for (const s of series) {
      const value = Number(point[s.field] || 0);
      if (!value) continue;
      const height = (value / max) * plotH;
      y -= height;
      bars.push(svg('rect', {
        x: (PAD.left + i * step + step * 0.1).toFixed(1),
        y: y.toFixed(1),
        width: Math.max(1, step * 0.8).toFixed(1),
        height: Math.max(0.5, height).toFixed(1),
        class: s.className,
      }, svg('title', {}, `${point.hour.slice(0, 13).replace('T', ' ')}:00 UTC: ${value} ${s.name}`)));
    }
  });
  const first = hours.length ? hours[0].hour.slice(0, 13).replace('T', ' ') + ':00' : '';
  const last = hours.length ? hours[hours.length - 1].hour.slice(0, 13).replace('T', ' ') + ':00' : '';
  const total = totals.reduce((a, b) => a + b, 0);
  return h('figure', { class: 'chart' },
    h('figcaption', {}, title, ' ',
      series.map((s) => h('span', { class: `legend ${s.className}` }, s.name))),
    svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${title}: ${total} in total, at most ${max} in an hour` },
      svg('line', { x1: PAD.left, y1: PAD.top + plotH, x2: W - PAD.right, y2: PAD.top + plotH, class: 'axis' }),
      svg('line', { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: PAD.top + plotH, class: 'axis' }),
      svg('text', { x: PAD.left - 4, y: PAD.top + 10, 'text-anchor': 'end', class: 'tick' }, String(max)),
      svg('text', { x: PAD.left - 4, y: PAD.top + plotH, 'text-anchor': 'end', class: 'tick' }, '0'),
      svg('text', { x: PAD.left, y: H - 4, class: 'tick' }, first),
      svg('text', { x: W - PAD.right, y: H - 4, 'text-anchor': 'end', class: 'tick' }, `${last} UTC`),
      bars));
}

// Hourly lines (for latency percentiles): an hour without a value (no requests) breaks the
// line instead of drawing a fake zero. Each point carries its value as a <title>.
export function lineChart({ title, hours, series, unit }) {
  const values = hours.flatMap((point) => series.map((s) => Number(point[s.field] || 0)));
  const max = Math.max(1, ...values);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const step = plotW / Math.max(1, hours.length);
  const x = (i) => PAD.left + i * step + step / 2;
  const y = (v) => PAD.top + plotH - (v / max) * plotH;
  const marks = [];
  for (const s of series) {
    let run = [];
    const flush = () => {
      if (run.length > 1) marks.push(svg('polyline', { points: run.join(' '), class: `line ${s.className}` }));
      run = [];
    };
    hours.forEach((point, i) => {
      const value = Number(point[s.field] || 0);
      if (!value) { flush(); return; }
      run.push(`${x(i).toFixed(1)},${y(value).toFixed(1)}`);
      marks.push(svg('circle', { cx: x(i).toFixed(1), cy: y(value).toFixed(1), r: 2.5, class: `dot ${s.className}` },
        svg('title', {}, `${point.hour.slice(0, 13).replace('T', ' ')}:00 UTC: ${s.name} ${value.toFixed(1)} ${unit}`)));
    });
    flush();
  }
  const first = hours.length ? hours[0].hour.slice(0, 13).replace('T', ' ') + ':00' : '';
  const last = hours.length ? hours[hours.length - 1].hour.slice(0, 13).replace('T', ' ') + ':00' : '';
  return h('figure', { class: 'chart' },
    h('figcaption', {}, title, ' ',
      series.map((s) => h('span', { class: `legend ${s.className}` }, s.name))),
    svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${title}: at most ${max.toFixed(1)} ${unit}` },
      svg('line', { x1: PAD.left, y1: PAD.top + plotH, x2: W - PAD.right, y2: PAD.top + plotH, class: 'axis' }),
      svg('line', { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: PAD.top + plotH, class: 'axis' }),
      svg('text', { x: PAD.left - 4, y: PAD.top + 10, 'text-anchor': 'end', class: 'tick' }, `${max.toFixed(0)} ${unit}`),
      svg('text', { x: PAD.left - 4, y: PAD.top + plotH, 'text-anchor': 'end', class: 'tick' }, '0'),
      svg('text', { x: PAD.left, y: H - 4, class: 'tick' }, first),
      svg('text', { x: W - PAD.right, y: H - 4, 'text-anchor': 'end', class: 'tick' }, `${last} UTC`),
      marks));
}

export function meter({ label, used, limit, format }) {
  const share = limit ? Math.min(1, used / limit) : 0;
  return h('div', { class: 'meter' },
    h('div', { class: 'meter-label' }, label, ': ', format(used), limit ? ` of ${format(limit)}` : ' (no limit)'),
    svg('svg', { viewBox: '0 0 200 10', role: 'img', 'aria-label': label, preserveAspectRatio: 'none' },
      svg('rect', { x: 0, y: 0, width: 200, height: 10, class: 'meter-bg' }),
      svg('rect', { x: 0, y: 0, width: (200 * share).toFixed(1), height: 10, class: share >= 0.9 ? 'meter-hot' : 'meter-fill' })));
}
