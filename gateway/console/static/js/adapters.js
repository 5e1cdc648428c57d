// Adapters: the registry as a sortable, filterable table with a traffic sparkline per adapter;
// upload by drag and drop (adapter files or one archive); pin, unpin, load and delete.
import { api, ApiError } from './api.js';
import { sparkline } from './charts.js';
import { clear, el, fmtBytes, fmtNumber, fmtTime, message } from './dom.js';
import { Poller } from './poll.js';

const COLUMNS = [
  { key: 'id', label: 'Id' },
  { key: 'kind', label: 'Kind' },
  { key: 'size', label: 'Rank / virtual tokens', value: (a) => a.rank ?? a.num_virtual_tokens ?? null },
  { key: 'tier', label: 'Tier' },
  { key: 'pinned', label: 'Pinned' },
  { key: 'requests', label: 'Requests' },
  { key: 'tokens', label: 'Tokens', value: (a) => a.prompt_tokens + a.completion_tokens },
  { key: 'last_used', label: 'Last used' },
];
const state = { sort: 'id', descending: false, filter: '', adapters: [], traffic: new Map() };
let root = null; let tbody = null; let status = null; let filterInput = null;
const poller = new Poller(refresh, 2000);

function valueOf(adapter, key) {
  const column = COLUMNS.find((c) => c.key === key);
  return column && column.value ? column.value(adapter) : adapter[key];
}

const HISTORY = 30;  // polls kept per sparkline (one minute)

async function refresh() {
  const [list, traffic] = await Promise.all([api('GET', '/admin/adapters'), api('GET', '/console/api/traffic')]);
  state.adapters = list.data;
  for (const a of list.data) {  // per poll: requests finished, and their mean latency
    const now = traffic.data[a.id] || { count: 0, sum: 0 };
    const seen = state.traffic.get(a.id) || { last: now, requests: [], latency: [] };
    const finished = Math.max(0, now.count - seen.last.count);
    seen.requests.push(finished);
    seen.latency.push(finished ? (now.sum - seen.last.sum) / finished : 0);
    seen.last = now;
    if (seen.requests.length > HISTORY) { seen.requests.shift(); seen.latency.shift(); }
    state.traffic.set(a.id, seen);
  }
  render();
}

function explain(error) {
  if (error instanceof ApiError && error.status === 409) {
    return `${error.message}\n(409 conflict: an experiment still routes traffic to this adapter, or it is busy. ` +
      'Stop or delete the experiment that names it as an arm, then try again.)';
  }
  return error.message;
}

async function act(method, path, what) {
  try {
    await api(method, path);
    message(status, `${what}: done`, 'ok');
  } catch (error) {
    message(status, explain(error));
  }
  await refresh().catch(() => {});
}

function actions(a) {
  const id = encodeURIComponent(a.id);
  return el('td', { class: 'actions' },
    a.pinned
      ? el('button', { type: 'button', 'data-action': 'unpin', onclick: () => act('POST', `/admin/adapters/${id}/unpin`, `unpin ${a.id}`) }, 'Unpin')
      : el('button', { type: 'button', 'data-action': 'pin', onclick: () => act('POST', `/admin/adapters/${id}/pin`, `pin ${a.id}`) }, 'Pin'),
    el('button', { type: 'button', 'data-action': 'load', onclick: () => act('POST', `/admin/adapters/${id}/load`, `load ${a.id}`) }, 'Load'),
    el('button', { type: 'button', class: 'danger', 'data-action': 'delete', onclick: () => {
      if (window.confirm(`Delete adapter ${a.id}?`)) act('DELETE', `/admin/adapters/${id}`, `delete ${a.id}`);
    } }, 'Delete'));
}

function trafficCell(seen) {
  if (!seen) return el('td', {});
  const recent = seen.latency.filter((v) => v > 0);
  return el('td', { class: 'traffic' },
    el('div', { title: 'requests finished per 2 s' }, sparkline(seen.requests)),
    el('div', { title: 'mean latency of those requests' }, sparkline(seen.latency)),
    el('span', { class: 'muted latency' }, recent.length ? `${fmtNumber(recent[recent.length - 1], 2)} s` : ''));
}

function render() {
  if (!tbody) return;
  const needle = state.filter.toLowerCase();
  const rows = state.adapters.filter((a) => !needle || [a.id, a.kind, a.tier].some((v) => String(v).toLowerCase().includes(needle)));
  rows.sort((x, y) => {
    const [a, b] = [valueOf(x, state.sort), valueOf(y, state.sort)];
    const order = a === b ? 0 : a === null || a === undefined ? -1 : b === null || b === undefined ? 1 : a < b ? -1 : 1;
    return state.descending ? -order : order;
  });
  clear(tbody).append(...rows.map((a) => el('tr', { 'data-adapter': a.id },
    el('td', { class: 'adapter-id' }, a.id),
    el('td', {}, a.kind),
    el('td', {}, fmtNumber(valueOf(a, 'size'))),
    el('td', { class: 'tier' }, a.tier),
    el('td', { class: 'pinned' }, a.pinned ? 'yes' : 'no'),
    el('td', {}, fmtNumber(a.requests)),
    el('td', {}, fmtNumber(valueOf(a, 'tokens'))),
    el('td', {}, fmtTime(a.last_used)),
    trafficCell(state.traffic.get(a.id)),
    actions(a))));
  if (!rows.length) tbody.append(el('tr', {}, el('td', { colspan: COLUMNS.length + 2, class: 'muted' }, 'No adapters.')));
}

function header() {
  const row = el('tr', {});
  for (const column of COLUMNS) {
    const th = el('th', { class: 'sortable', 'data-sort': column.key }, column.label);
    if (column.key === state.sort) th.classList.add(state.descending ? 'sorted-desc' : 'sorted-asc');
    th.addEventListener('click', () => {
      state.descending = state.sort === column.key ? !state.descending : false;
      state.sort = column.key;
      for (const other of row.querySelectorAll('th')) other.classList.remove('sorted-asc', 'sorted-desc');
      th.classList.add(state.descending ? 'sorted-desc' : 'sorted-asc');
      render();
    });
    row.append(th);
  }
  row.append(el('th', {}, 'Requests / latency (1 min)'), el('th', {}, 'Actions'));
  return row;
}

async function upload(files, idInput, replaceBox, uploadStatus) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append('files', file, file.name);
  if (idInput.value.trim()) form.append('id', idInput.value.trim());
  if (replaceBox.checked) form.append('replace', 'true');
  message(uploadStatus, `uploading ${files.map((f) => `${f.name} (${fmtBytes(f.size)})`).join(', ')}…`, 'ok');
  try {
    const entry = await api('POST', '/admin/adapters', form);
    message(uploadStatus, `registered ${entry.id} (${entry.kind})`, 'ok');
    idInput.value = '';
  } catch (error) {
    message(uploadStatus, error.message);  // the server's validation message, as is
  }
  await refresh().catch(() => {});
}

function uploader() {
  const idInput = el('input', { type: 'text', id: 'upload-id', placeholder: 'id (optional)', maxlength: '64' });
  const replaceBox = el('input', { type: 'checkbox', id: 'upload-replace' });
  const uploadStatus = el('p', { class: 'message', id: 'upload-status', role: 'status' });
  const picker = el('input', { type: 'file', id: 'upload-files', multiple: true,
    accept: '.json,.safetensors,.md,.zip,.tar,.tar.gz,.tgz' });
  picker.addEventListener('change', () => { upload([...picker.files], idInput, replaceBox, uploadStatus); picker.value = ''; });
  const zone = el('div', { class: 'dropzone', id: 'dropzone' },
    'Drop adapter_config.json + adapter_model.safetensors, or one .zip / .tar.gz archive, here — or ', picker);
  zone.addEventListener('dragover', (event) => { event.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (event) => {
    event.preventDefault();
    zone.classList.remove('over');
    upload([...event.dataTransfer.files], idInput, replaceBox, uploadStatus);
  });
  return el('div', {}, el('h2', {}, 'Upload'),
    el('div', { class: 'row' }, idInput, el('label', {}, replaceBox, ' replace an adapter with the same id')),
    zone, uploadStatus);
}

export function show(section, params) {
  root = section;
  status = el('p', { class: 'message', id: 'adapters-status', role: 'status' });
  filterInput = el('input', { type: 'search', id: 'adapters-filter', placeholder: 'filter by id, kind or tier' });
  filterInput.addEventListener('input', () => { state.filter = filterInput.value; render(); });
  tbody = el('tbody', {});
  clear(root).append(el('h1', {}, 'Adapters'), el('div', { class: 'row' }, filterInput), status,
    el('table', { id: 'adapters-table' }, el('thead', {}, header()), tbody), uploader());
  update(params);
  poller.start();
}

// #/adapters?filter=ID (e.g. a training job's result) filters the table; plain #/adapters shows all
export function update(params) {
  if (!filterInput) return;
  filterInput.value = (params && params.get('filter')) || '';
  state.filter = filterInput.value;
  render();
}

export function hide() { poller.stop(); }
