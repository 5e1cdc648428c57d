// Overview: the base model, memory, engine queue, tokens per second and tier occupancy, live.
import { api } from './api.js';
import { sparkline } from './charts.js';
import { clear, el, fmtBytes, fmtDuration, fmtNumber, svg } from './dom.js';
import { Poller } from './poll.js';

let root = null;
const history = [];
const poller = new Poller(refresh, 2000);

function card(label, value, id) {
  return el('div', { class: 'card' }, el('div', { class: 'label' }, label), el('div', { class: 'value', 'data-stat': id }, value));
}

function tierBar(used, capacity) {
  const width = 200;
  const fill = capacity ? Math.min(1, used / capacity) * width : 0;
  return svg('svg', { class: 'tier-bar', width, height: 10, viewBox: `0 0 ${width} 10` },
    svg('rect', { x: 0, y: 0, width, height: 10, fill: '#e7eaf0' }),
    svg('rect', { class: 'fill', x: 0, y: 0, width: fill, height: 10 }));
}

async function refresh() {
  const s = await api('GET', '/console/api/status');
  history.push(s.engine.tokens_per_second);
  if (history.length > 60) history.shift();
  const memory = s.memory;
  const deviceMemory = memory.device_total_bytes
    ? `${fmtBytes(memory.device_allocated_bytes)} / ${fmtBytes(memory.device_total_bytes)}`
    : `${fmtBytes(memory.process_rss_bytes)} (process)`;
  const tiers = s.tiers;
  clear(root).append(
    el('h1', {}, 'Overview'),
    el('div', { class: 'cards' },
      card('Base model', s.base_model.name, 'base-model'),
      card('Device', `${s.base_model.device} · ${s.base_model.quantization} · ${s.base_model.dtype}`, 'device'),
      card('Memory', deviceMemory, 'memory'),
      card('Model weights', fmtBytes(memory.model_bytes), 'model-bytes'),
      card('Queue depth', fmtNumber(s.engine.queue_depth), 'queue-depth'),
      card('Running sequences', fmtNumber(s.engine.running_sequences), 'running'),
      el('div', { class: 'card' }, el('div', { class: 'label' }, 'Tokens/s now (last 2 min)'),
        el('div', { class: 'value', 'data-stat': 'tokens-per-second' }, fmtNumber(s.engine.tokens_per_second, 1)),
        sparkline(history, { width: 180, height: 28 })),
      card('Training tokens/s', `${fmtNumber(s.training.tokens_per_second, 1)} (${s.training.running} running)`, 'training'),
      card('Experiments', fmtNumber(s.experiments), 'experiments'),
      card('Uptime', fmtDuration(s.uptime_seconds), 'uptime')),
    el('h2', {}, 'Adapter tiers'),
    el('table', { id: 'tiers' },
      el('thead', {}, el('tr', {}, el('th', {}, 'Tier'), el('th', {}, 'Held'), el('th', {}, 'Capacity'), el('th', {}, 'Occupancy'))),
      el('tbody', {},
        el('tr', {}, el('td', {}, 'device'), el('td', { 'data-tier': 'device' }, fmtNumber(tiers.device.used)),
          el('td', {}, fmtNumber(tiers.device.capacity)), el('td', {}, tierBar(tiers.device.used, tiers.device.capacity))),
        el('tr', {}, el('td', {}, 'cpu'), el('td', { 'data-tier': 'cpu' }, fmtNumber(tiers.cpu.used)),
          el('td', {}, fmtNumber(tiers.cpu.capacity)), el('td', {}, tierBar(tiers.cpu.used, tiers.cpu.capacity))),
        el('tr', {}, el('td', {}, 'disk'), el('td', { 'data-tier': 'disk' }, fmtNumber(tiers.disk.used)),
          el('td', {}, fmtBytes(tiers.disk.bytes)), el('td', {}, tiers.missing ? `${tiers.missing} missing files` : '')))));
}

export function show(section) { root = section; poller.start(); }
export function hide() { poller.stop(); }
