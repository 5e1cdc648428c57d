// Charts drawn as SVG by the project: a line chart (loss curves), a sparkline and confidence-
// interval bars. Styling comes from classes in console.css (no inline style: the CSP forbids it).
import { svg } from './dom.js';

function niceTicks(min, max, count) {
  if (!(max > min)) return [min];
  const raw = (max - min) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(min / step) * step; t <= max + step * 1e-9; t += step) ticks.push(Number(t.toFixed(10)));
  return ticks;
}

// series: [{name, className, points: [[x, y], ...], dots}]
export function lineChart(series, { width = 640, height = 260, xLabel = 'step', yLabel = 'loss' } = {}) {
  const pad = { left: 48, right: 12, top: 12, bottom: 30 };
  const all = series.flatMap((s) => s.points);
  const root = svg('svg', { class: 'chart', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `${yLabel} by ${xLabel}` });
  if (!all.length) {
    root.append(svg('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle', class: 'tick' }, 'no points yet'));
    return root;
  }
  let [xMin, xMax] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [yMin, yMax] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (xMax === xMin) { xMin -= 1; xMax += 1; }
  if (yMax === yMin) { yMin -= 0.5; yMax += 0.5; }
  const x = (v) => pad.left + ((v - xMin) / (xMax - xMin)) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - ((v - yMin) / (yMax - yMin)) * (height - pad.top - pad.bottom);
  for (const t of niceTicks(yMin, yMax, 5)) {
    root.append(svg('line', { class: 'grid', x1: pad.left, x2: width - pad.right, y1: y(t), y2: y(t) }));
    root.append(svg('text', { class: 'tick', x: pad.left - 4, y: y(t) + 3, 'text-anchor': 'end' }, t.toPrecision(3)));
  }
  for (const t of niceTicks(xMin, xMax, 8)) {
    root.append(svg('text', { class: 'tick', x: x(t), y: height - pad.bottom + 14, 'text-anchor': 'middle' }, String(t)));
  }
  root.append(svg('line', { class: 'axis', x1: pad.left, x2: pad.left, y1: pad.top, y2: height - pad.bottom }));
  root.append(svg('line', { class: 'axis', x1: pad.left, x2: width - pad.right, y1: height - pad.bottom, y2: height - pad.bottom }));
  root.append(svg('text', { class: 'tick', x: width - pad.right, y: height - 4, 'text-anchor': 'end' }, xLabel));
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? 'L' : 'M'}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(' ');
    root.append(svg('path', { class: s.className, d, 'data-series': s.name, 'data-points': s.points.length }));
    if (s.dots) for (const p of s.points) root.append(svg('circle', { class: s.dotClass, cx: x(p[0]), cy: y(p[1]), r: 3 }));
  }
  return root;
}

export function sparkline(values, { width = 100, height = 24 } = {}) {
  const root = svg('svg', { class: 'chart-spark', width, height, viewBox: `0 0 ${width} ${height}` });
  if (values.length < 2) return root;
  const max = Math.max(...values, 1e-9);
  const step = width / (values.length - 1);
  const d = values.map((v, i) => `${i ? 'L' : 'M'}${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`).join(' ');
  root.append(svg('path', { class: 'spark', d }));
  return root;
}

// A point estimate with its interval on a [lo, hi] scale, e.g. a positive rate in [0, 1].
export function ciBar(value, interval, { lo = 0, hi = 1, width = 160, height = 18 } = {}) {
  const root = svg('svg', { class: 'ci', width, height, viewBox: `0 0 ${width} ${height}` });
  const x = (v) => 4 + ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo || 1)) * (width - 8);
  root.append(svg('line', { class: 'ci-track', x1: 4, x2: width - 4, y1: height / 2, y2: height / 2 }));
  if (interval) root.append(svg('line', { class: 'ci-line', x1: x(interval[0]), x2: x(interval[1]), y1: height / 2, y2: height / 2 }));
  if (value !== null && value !== undefined) root.append(svg('circle', { class: 'ci-point', cx: x(value), cy: height / 2, r: 4 }));
  return root;
}
