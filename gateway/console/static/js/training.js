// Training: start a job (dataset upload, kind, settings with their defaults), follow it live over
// the job's events stream (SSE) with train and eval loss curves, progress, ETA; cancel; the result
// links to its adapter.
import { api } from './api.js';
import { lineChart } from './charts.js';
import { clear, el, fmtDuration, fmtNumber, fmtTime, message } from './dom.js';
import { Poller } from './poll.js';

const KINDS = ['lora', 'dora', 'adalora', 'vera', 'ia3', 'prompt_tuning', 'p_tuning', 'prefix_tuning'];
let root = null; let jobsBody = null; let detail = null; let defaults = null;
let selected = null; let events = null;
const poller = new Poller(refreshJobs, 3000);

function settingsTable(fields) {
  const body = el('tbody', {});
  for (const field of fields) {
    if (field.name === 'kind') continue;
    const shown = field.default === null ? '' : typeof field.default === 'object' ? JSON.stringify(field.default) : String(field.default);
    const input = el('input', { type: 'text', name: field.name, 'data-setting': field.name, placeholder: shown || 'none' });
    body.append(el('tr', {}, el('td', {}, el('code', {}, field.name)), el('td', {}, input),
      el('td', { class: 'muted' }, `default: ${shown || 'none'}. ${field.description}`)));
  }
  return el('details', {}, el('summary', {}, 'Settings (empty fields keep their default)'),
    el('table', { id: 'training-settings' }, el('thead', {}, el('tr', {}, el('th', {}, 'Setting'), el('th', {}, 'Value'), el('th', {}, 'Default and meaning'))), body));
}

function parseSetting(text) {
  try { return JSON.parse(text); } catch { return text; }  // numbers, booleans, lists; else a string
}

function startForm() {
  const dataset = el('input', { type: 'file', id: 'training-dataset', name: 'dataset', accept: '.jsonl,.json,.txt', required: true });
  const kind = el('select', { id: 'training-kind' }, KINDS.map((k) => el('option', { value: k }, k)));
  const problems = el('pre', { class: 'problems', id: 'dataset-problems', hidden: true });
  const formStatus = el('p', { class: 'message', id: 'training-form-status', role: 'status' });
  const settings = settingsTable(defaults);
  const form = el('form', { id: 'training-form' },
    el('div', { class: 'row' }, el('label', { for: 'training-dataset' }, 'Dataset (JSONL)'), dataset),
    problems,
    el('div', { class: 'row' }, el('label', { for: 'training-kind' }, 'Kind'), kind),
    settings,
    el('div', { class: 'row' }, el('button', { type: 'submit', class: 'primary', id: 'training-start' }, 'Start training')),
    formStatus);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    problems.hidden = true;
    message(formStatus, '');
    if (!dataset.files.length) { message(formStatus, 'choose a dataset file'); return; }
    const config = { kind: kind.value };
    for (const input of settings.querySelectorAll('input[data-setting]')) {
      if (input.value.trim() !== '') config[input.dataset.setting] = parseSetting(input.value.trim());
    }
    const body = new FormData();
    body.append('dataset', dataset.files[0], dataset.files[0].name);
    body.append('config', JSON.stringify(config));
    try {
      const job = await api('POST', '/admin/training-jobs', body);
      message(formStatus, `job ${job.id} started`, 'ok');
      await refreshJobs();
      select(job.id);
    } catch (error) {
      if (error.param === 'dataset') { problems.textContent = error.message; problems.hidden = false; } else message(formStatus, error.message);
    }
  });
  return form;
}

async function refreshJobs() {
  const list = await api('GET', '/admin/training-jobs');
  clear(jobsBody);
  for (const job of list.data.slice().reverse()) {
    const p = job.progress || {};
    const row = el('tr', { 'data-job': job.id, class: job.id === selected ? 'selected' : '' },
      el('td', {}, el('a', { href: `#/training?job=${encodeURIComponent(job.id)}` }, job.id)),
      el('td', { class: 'job-state' }, job.state),
      el('td', {}, job.config.kind),
      el('td', {}, p.total_steps ? `${p.step} / ${p.total_steps}` : '–'),
      el('td', {}, fmtTime(job.created)),
      el('td', {}, job.adapter_id ? el('a', { href: `#/adapters?filter=${encodeURIComponent(job.adapter_id)}` }, job.adapter_id) : ''));
    jobsBody.append(row);
  }
  if (!list.data.length) jobsBody.append(el('tr', {}, el('td', { colspan: 6, class: 'muted' }, 'No training jobs yet.')));
}

function renderJob(job) {
  const p = job.progress || {};
  const train = (p.train_loss || []).map(([step, loss]) => [step, loss]);
  const evalPoints = (p.eval_loss || []).map(([step, loss]) => [step, loss]);
  const done = ['succeeded', 'failed', 'cancelled'].includes(job.state);
  const cancel = el('button', { type: 'button', class: 'danger', id: 'training-cancel', disabled: done, onclick: async () => {
    try { await api('POST', `/admin/training-jobs/${encodeURIComponent(job.id)}/cancel`); } catch (error) { message(jobStatus, error.message); }
  } }, 'Cancel');
  const jobStatus = el('p', { class: 'message', role: 'status' });
  const bar = el('progress', { class: 'progress', id: 'training-progress', max: String(p.total_steps || 1), value: String(p.step || 0) });
  const parts = [
    el('h2', {}, 'Job ', el('span', { id: 'training-job-id' }, job.id), ' — ', el('span', { id: 'training-job-state' }, job.state)),
    el('div', { class: 'row' }, bar),
    el('div', { class: 'row' },
      el('span', {}, `phase ${p.phase || '–'} · step `, el('span', { id: 'training-step' }, String(p.step || 0)), ` of ${p.total_steps || '–'}`),
      el('span', {}, ` · ETA ${job.state === 'running' ? fmtDuration(p.eta_seconds) : '–'}`),
      el('span', {}, ` · ${fmtNumber(p.tokens_per_second, 1)} tokens/s`),
      el('span', {}, ` · eval loss before ${fmtNumber(p.eval_loss_before, 4)}, after ${fmtNumber(p.eval_loss_after, 4)}`),
      cancel),
    el('div', { class: 'row' }, el('span', { class: 'legend-train' }, '— train loss'), el('span', { class: 'legend-eval' }, '— eval loss')),
    el('div', { id: 'loss-chart' }, lineChart([
      { name: 'train', className: 'series-train', points: train },
      { name: 'eval', className: 'series-eval', points: evalPoints, dots: true, dotClass: 'dot-eval' }])),
    job.error ? el('p', { class: 'message error', id: 'training-error' }, job.error) : null,
    job.note ? el('p', { class: 'message', id: 'training-note' }, job.note) : null,
    job.adapter_id ? el('p', { id: 'training-result' }, 'Result: adapter ',
      el('a', { href: `#/adapters?filter=${encodeURIComponent(job.adapter_id)}` }, job.adapter_id)) : null,
    jobStatus];
  clear(detail).append(...parts.filter(Boolean));
}

function follow(jobId) {
  if (events) events.close();
  events = new EventSource(`/admin/training-jobs/${encodeURIComponent(jobId)}/events`);  // the cookie rides along
  events.addEventListener('progress', (event) => {
    const job = JSON.parse(event.data);
    if (job.id !== selected) return;
    renderJob(job);
    if (['succeeded', 'failed', 'cancelled'].includes(job.state)) { events.close(); events = null; refreshJobs().catch(() => {}); }
  });
  events.onerror = () => { /* EventSource reconnects by itself; a finished stream is closed above */ };
}

async function select(jobId) {
  if (!jobId) return;
  selected = jobId;
  try { renderJob(await api('GET', `/admin/training-jobs/${encodeURIComponent(jobId)}`)); } catch (error) { message(detail, error.message); return; }
  follow(jobId);
}

export async function show(section, params) {
  root = section;
  jobsBody = el('tbody', {});
  detail = el('div', { id: 'training-detail' });
  clear(root).append(el('h1', {}, 'Training'), el('p', { class: 'muted' }, 'Loading settings…'));
  defaults = (await api('GET', '/console/api/training-defaults')).data;
  // the job being watched first, then the list, then the form to start another
  clear(root).append(el('h1', {}, 'Training'), detail, el('h2', {}, 'Jobs'),
    el('table', { id: 'training-jobs' }, el('thead', {}, el('tr', {}, ['Job', 'State', 'Kind', 'Step', 'Created', 'Adapter'].map((h) => el('th', {}, h)))), jobsBody),
    el('h2', {}, 'Start a job'), startForm());
  poller.start();
  update(params);
}

export function update(params) {
  const job = params && params.get('job');
  if (job && job !== selected) select(job);
}

export function hide() { poller.stop(); if (events) { events.close(); events = null; } selected = null; }
