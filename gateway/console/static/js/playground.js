// Playground: chat with any model (base, adapter, experiment), streaming, with sampling settings;
// with two or more columns the same prompt goes to every column's model at once and all stream
// together.
import { api, streamChat } from './api.js';
import { clear, el, message } from './dom.js';

let root = null; let columnsBox = null; let models = []; let controllers = []; let experiments = new Set();
const columns = [];

function modelSelect(initial) {
  const select = el('select', { class: 'model-select' }, models.map((m) => el('option', { value: m }, m)));
  if (initial && models.includes(initial)) select.value = initial;
  return select;
}

function addColumn(initial) {
  const select = modelSelect(initial);
  const transcript = el('div', { class: 'transcript', 'aria-live': 'polite' });
  const status = el('p', { class: 'message column-status' });
  const column = { messages: [], select, transcript, status, node: null };
  column.node = el('div', { class: 'column', 'data-column': String(columns.length) },
    el('div', { class: 'row' }, select, el('button', { type: 'button', onclick: () => {
      if (columns.length <= 1) return;
      columns.splice(columns.indexOf(column), 1);
      column.node.remove();
    } }, 'Remove')),
    transcript, status);
  columns.push(column);
  columnsBox.append(column.node);
}

function turn(who, text) {
  const body = el('span', { class: `text ${who}` }, text);
  return { node: el('div', { class: `turn turn-${who}` }, el('span', { class: 'who' }, who), body), body };
}

function sampling(form) {
  const value = (id) => form.querySelector(`#${id}`).value.trim();
  const settings = { max_tokens: Number(value('pg-max-tokens')) || 64 };
  if (value('pg-temperature') !== '') settings.temperature = Number(value('pg-temperature'));
  if (value('pg-top-p') !== '') settings.top_p = Number(value('pg-top-p'));
  if (value('pg-seed') !== '') settings.seed = Number(value('pg-seed'));
  return settings;
}

// Thumbs on a reply an experiment routed: the feedback its results count (POST /v1/feedback)
function feedbackButtons(completionId) {
  const note = el('span', { class: 'muted feedback-status' });
  const vote = async (thumbs) => {
    try {
      await api('POST', '/v1/feedback', { id: completionId, thumbs });
      note.textContent = ` thumbs ${thumbs} recorded`;
    } catch (error) { note.textContent = ` ${error.message}`; }
  };
  return el('div', { class: 'feedback' },
    el('button', { type: 'button', class: 'thumbs-up-button', onclick: () => vote('up') }, 'Thumbs up'),
    el('button', { type: 'button', class: 'thumbs-down-button', onclick: () => vote('down') }, 'Thumbs down'), note);
}

async function send(form, prompt, system) {
  controllers = [];
  const settings = sampling(form);
  await Promise.all(columns.map(async (column) => {
    const controller = new AbortController();
    controllers.push(controller);
    column.messages.push({ role: 'user', content: prompt });
    column.transcript.append(turn('user', prompt).node);
    const reply = turn('assistant', '');
    reply.node.dataset.model = column.select.value;
    column.transcript.append(reply.node);
    message(column.status, 'streaming…', 'ok');
    const messages = system ? [{ role: 'system', content: system }, ...column.messages] : column.messages;
    let text = '';
    try {
      const model = column.select.value;
      const result = await streamChat({ model, messages, ...settings },
        (delta) => { text += delta; reply.body.textContent = text; }, controller.signal);
      column.messages.push({ role: 'assistant', content: text });
      message(column.status, `done (${result.finish || 'stopped'})${result.arm ? ` · arm ${result.arm}` : ''}`, 'ok');
      if (experiments.has(model) && result.id) reply.node.append(feedbackButtons(result.id));
      reply.node.dataset.done = 'true';
    } catch (error) {
      column.messages.pop();
      message(column.status, error.name === 'AbortError' ? 'stopped' : error.message);
      reply.node.dataset.done = 'error';
    }
  }));
}

export async function show(section) {
  root = section;
  const [v1, running] = await Promise.all([api('GET', '/v1/models'), api('GET', '/admin/experiments')]);
  models = v1.data.map((m) => m.id);
  // only a running experiment keeps outcomes and takes feedback
  experiments = new Set(running.data.filter((e) => e.state === 'running').map((e) => e.id));
  columns.length = 0;
  columnsBox = el('div', { class: 'columns', id: 'playground-columns' });
  const prompt = el('textarea', { id: 'pg-prompt', rows: '3', placeholder: 'Message (sent to every column)' });
  const system = el('textarea', { id: 'pg-system', rows: '2', placeholder: 'System prompt (optional)' });
  const formStatus = el('p', { class: 'message', role: 'status' });
  const sendButton = el('button', { type: 'submit', class: 'primary', id: 'pg-send' }, 'Send');
  const form = el('form', { id: 'playground-form' },
    el('div', { class: 'row' },
      el('label', {}, 'temperature ', el('input', { type: 'number', id: 'pg-temperature', min: '0', max: '2', step: '0.1', value: '0' })),
      el('label', {}, 'top_p ', el('input', { type: 'number', id: 'pg-top-p', min: '0', max: '1', step: '0.05', value: '1' })),
      el('label', {}, 'max_tokens ', el('input', { type: 'number', id: 'pg-max-tokens', min: '1', step: '1', value: '64' })),
      el('label', {}, 'seed ', el('input', { type: 'number', id: 'pg-seed', step: '1', placeholder: 'none' }))),
    system, prompt,
    el('div', { class: 'row' }, sendButton,
      el('button', { type: 'button', id: 'pg-stop', onclick: () => controllers.forEach((c) => c.abort()) }, 'Stop'),
      el('button', { type: 'button', id: 'pg-add-column', onclick: () => addColumn(models[0]) }, 'Add model to compare'),
      el('button', { type: 'button', id: 'pg-clear', onclick: () => { for (const c of columns) { c.messages = []; clear(c.transcript); message(c.status, ''); } } }, 'Clear')),
    formStatus);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    sendButton.disabled = true;
    prompt.value = '';
    try { await send(form, text, system.value.trim()); } finally { sendButton.disabled = false; }
  });
  clear(root).append(el('h1', {}, 'Playground'), form, columnsBox);
  addColumn(models[0]);
}
