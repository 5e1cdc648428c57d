// Experiments: create (arms, weights, stickiness), ramp weights with sliders, stop, promote; per-arm
// results with confidence-interval bars and the verdict in plain words, refreshed live.
import { api } from './api.js';
import { ciBar } from './charts.js';
import { clear, el, fmtNumber, message } from './dom.js';
import { Poller } from './poll.js';

let root = null; let list = null; let status = null; let models = [];
const poller = new Poller(refresh, 2000);
const cards = new Map();  // experiment name -> {card, resultsBox, sliders}

async function loadModels() {
  const [adapters, v1] = await Promise.all([api('GET', '/admin/adapters'), api('GET', '/v1/models')]);
  const base = v1.data.length ? v1.data[0].id : null;  // the base model comes first
  models = [base, ...adapters.data.map((a) => a.id)].filter(Boolean);
}

function armRow(arms) {
  const select = el('select', { class: 'arm-model' }, models.map((m) => el('option', { value: m }, m)));
  const weight = el('input', { type: 'number', class: 'arm-weight', min: '0', step: 'any', value: '1' });
  const row = el('div', { class: 'row arm' }, el('label', {}, 'arm ', select), el('label', {}, 'weight ', weight),
    el('button', { type: 'button', onclick: () => row.remove() }, 'Remove'));
  arms.append(row);
  return row;
}

function createForm() {
  const name = el('input', { type: 'text', id: 'experiment-name', required: true, maxlength: '64', placeholder: 'name clients send as model' });
  const stickiness = el('select', { id: 'experiment-stickiness' }, ['user', 'header', 'request'].map((s) => el('option', { value: s }, s)));
  const header = el('input', { type: 'text', id: 'experiment-header', placeholder: 'subject header (stickiness: header)' });
  const arms = el('div', { id: 'experiment-arms' });
  const formStatus = el('p', { class: 'message', id: 'experiment-form-status', role: 'status' });
  armRow(arms); armRow(arms);
  const form = el('form', { id: 'experiment-form' },
    el('div', { class: 'row' }, el('label', { for: 'experiment-name' }, 'Name'), name,
      el('label', { for: 'experiment-stickiness' }, 'Stickiness'), stickiness, header),
    el('p', { class: 'muted' }, 'The first arm is the control.'), arms,
    el('div', { class: 'row' }, el('button', { type: 'button', onclick: () => armRow(arms) }, 'Add arm'),
      el('button', { type: 'submit', class: 'primary', id: 'experiment-create' }, 'Create experiment')),
    formStatus);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const body = {
      name: name.value.trim(), stickiness: stickiness.value,
      arms: [...arms.querySelectorAll('.arm')].map((row) => ({
        name: row.querySelector('.arm-model').value, weight: Number(row.querySelector('.arm-weight').value) })),
    };
    if (stickiness.value === 'header' && header.value.trim()) body.subject_header = header.value.trim();
    try {
      await api('POST', '/admin/experiments', body);
      message(formStatus, `experiment ${body.name} created`, 'ok');
      name.value = '';
      await refresh();
    } catch (error) { message(formStatus, error.message); }
  });
  return form;
}

async function act(method, path, body, what) {
  try { await api(method, path, body); message(status, `${what}: done`, 'ok'); } catch (error) { message(status, error.message); }
  await refresh().catch(() => {});
}

function slidersFor(experiment) {
  const box = el('div', { class: 'sliders' });
  const total = experiment.arms.reduce((sum, a) => sum + a.weight, 0) || 1;
  for (const arm of experiment.arms) {
    const share = el('span', { class: 'share' }, `${fmtNumber((arm.weight / total) * 100, 1)} %`);
    const slider = el('input', { type: 'range', min: '0', max: '100', step: '1', class: 'weight-slider', 'data-arm': arm.name,
      value: String(Math.round((arm.weight / total) * 100)), disabled: experiment.state !== 'running' });
    slider.addEventListener('input', () => { share.textContent = `${slider.value} (weight)`; });
    slider.addEventListener('change', () => {
      const weights = {};
      for (const s of box.querySelectorAll('.weight-slider')) weights[s.dataset.arm] = Number(s.value);
      act('PATCH', `/admin/experiments/${encodeURIComponent(experiment.id)}`, { weights }, `weights of ${experiment.id}`);
    });
    box.append(el('div', { class: 'row' }, el('span', { class: 'arm-name' }, arm.name), slider, share));
  }
  return box;
}

function resultsTable(results) {
  const body = el('tbody', {});
  for (const arm of results.arms) {
    const thumbs = arm.feedback.thumbs; const score = arm.feedback.score;
    body.append(el('tr', { 'data-arm': arm.arm },
      el('td', {}, arm.arm), el('td', {}, `${fmtNumber(arm.share * 100, 1)} %`),
      el('td', { class: 'arm-requests' }, fmtNumber(arm.requests)), el('td', {}, fmtNumber(arm.errors)),
      el('td', {}, arm.latency_seconds.p50 === null ? '–' : `${fmtNumber(arm.latency_seconds.p50, 2)} s`),
      el('td', {}, el('span', { class: 'thumbs-up' }, String(thumbs.up)), ' up / ',
        el('span', { class: 'thumbs-down' }, String(thumbs.down)), ' down', el('br'), ciBar(thumbs.positive_rate, thumbs.ci95),
        el('span', { class: 'muted' }, thumbs.ci95 ? ` ${fmtNumber(thumbs.positive_rate * 100, 0)} % [${fmtNumber(thumbs.ci95[0] * 100, 0)}, ${fmtNumber(thumbs.ci95[1] * 100, 0)}]` : ' no ratings')),
      el('td', {}, `n=${score.count}`, el('br'), ciBar(score.mean, score.ci95, { lo: Math.min(0, score.ci95 ? score.ci95[0] : 0), hi: Math.max(1, score.ci95 ? score.ci95[1] : 1) }),
        el('span', { class: 'muted' }, score.mean === null ? ' no scores' : ` mean ${fmtNumber(score.mean, 2)}`))));
  }
  const verdicts = el('ul', { class: 'verdicts' }, results.comparisons.map((c) => el('li', {},
    el('strong', {}, `${c.arm} vs ${c.control}`),
    el('div', {}, 'thumbs: ', el('span', { class: 'verdict', 'data-metric': 'thumbs' }, c.thumbs.verdict)),
    el('div', {}, 'score: ', el('span', { class: 'verdict', 'data-metric': 'score' }, c.score.verdict)))));
  return el('div', {}, el('table', { class: 'results' }, el('thead', {}, el('tr', {},
    ['Arm', 'Share', 'Requests', 'Errors', 'Latency p50', 'Thumbs (95 % CI)', 'Score (95 % CI)'].map((h) => el('th', {}, h)))), body), verdicts);
}

function card(experiment) {
  const id = encodeURIComponent(experiment.id);
  const promoteSelect = el('select', { class: 'promote-arm' }, experiment.arms.map((a) => el('option', { value: a.name }, a.name)));
  const resultsBox = el('div', { class: 'results-box' });
  const node = el('div', { class: 'card experiment', 'data-experiment': experiment.id },
    el('h2', {}, el('span', { class: 'experiment-name' }, experiment.id), ' ',
      el('span', { class: 'muted experiment-state' }, `${experiment.state}${experiment.winner ? ` · winner ${experiment.winner}` : ''} · stickiness ${experiment.stickiness}`)),
    slidersFor(experiment),
    el('div', { class: 'row' },
      el('button', { type: 'button', 'data-action': 'stop', disabled: experiment.state !== 'running',
        onclick: () => act('POST', `/admin/experiments/${id}/stop`, undefined, `stop ${experiment.id}`) }, 'Stop'),
      promoteSelect,
      el('button', { type: 'button', 'data-action': 'promote', disabled: experiment.state !== 'running',
        onclick: () => act('POST', `/admin/experiments/${id}/promote`, { arm: promoteSelect.value }, `promote in ${experiment.id}`) }, 'Promote'),
      el('button', { type: 'button', class: 'danger', 'data-action': 'delete', onclick: () => {
        if (window.confirm(`Delete experiment ${experiment.id}?`)) act('DELETE', `/admin/experiments/${id}`, undefined, `delete ${experiment.id}`);
      } }, 'Delete')),
    resultsBox);
  return { node, resultsBox, signature: JSON.stringify(experiment) };
}

async function refresh() {
  const experiments = (await api('GET', '/admin/experiments')).data;
  const names = new Set(experiments.map((e) => e.id));
  for (const [name, entry] of cards) if (!names.has(name)) { entry.node.remove(); cards.delete(name); }
  for (const experiment of experiments) {
    let entry = cards.get(experiment.id);
    const signature = JSON.stringify(experiment);
    if (!entry || entry.signature !== signature) {  // rebuilt only when it changed: a slider being dragged survives polls
      const fresh = card(experiment);
      if (entry) {
        fresh.resultsBox.append(...entry.resultsBox.childNodes);  // the last results stay until the new ones come
        entry.node.replaceWith(fresh.node);
      } else list.append(fresh.node);
      cards.set(experiment.id, fresh);
      entry = fresh;
    }
    const results = await api('GET', `/admin/experiments/${encodeURIComponent(experiment.id)}/results`);
    clear(entry.resultsBox).append(resultsTable(results));
  }
  if (!experiments.length && !list.querySelector('.muted')) list.append(el('p', { class: 'muted' }, 'No experiments.'));
  if (experiments.length) for (const note of list.querySelectorAll(':scope > p.muted')) note.remove();
}

export async function show(section) {
  root = section;
  cards.clear();
  list = el('div', { id: 'experiments-list' });
  status = el('p', { class: 'message', id: 'experiments-status', role: 'status' });
  await loadModels();
  clear(root).append(el('h1', {}, 'Experiments'), el('h2', {}, 'Create'), createForm(), status, el('h2', {}, 'Running and past'), list);
  poller.start();
}

export function hide() { poller.stop(); }
