// Calls to the gateway from the page. The session cookie (HttpOnly) rides along by itself; every
// call that is not a GET carries the session's CSRF token, fetched from /console/api/session and
// kept only in this module's memory.

let csrfToken = null;
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : null;
    super(error && error.message ? error.message : `HTTP ${status}`);
    this.status = status;
    this.param = error ? error.param : null;
    this.code = error ? error.code : null;
  }
}

export function onSignedOut(callback) { listeners.add(callback); }

function signedOut() { csrfToken = null; for (const callback of listeners) callback(); }

export async function loadSession() {
  const response = await fetch('/console/api/session', { credentials: 'same-origin', cache: 'no-store' });
  if (!response.ok) return false;
  const body = await response.json();
  csrfToken = body.csrf_token;
  return Boolean(body.signed_in);
}

function headersFor(method, extra = {}) {
  const headers = { ...extra };
  if (method !== 'GET' && method !== 'HEAD') headers['X-CSRF-Token'] = csrfToken || '';
  return headers;
}

export async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', cache: 'no-store', headers: headersFor(method) };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers['Content-Type'] = 'application/json'; }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  if (text) { try { data = JSON.parse(text); } catch { data = null; } }
  if (response.status === 401) signedOut();
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export async function signOut() {
  try { await api('POST', '/console/api/sign-out'); } finally { signedOut(); }
}

// POST /v1/chat/completions with stream: true; calls onDelta(text) per piece and returns
// {finish, id, arm}: the finish reason, the completion's id (for feedback) and, for an experiment,
// the arm that answered. Server-sent events are read from the response body (EventSource cannot POST).
export async function streamChat(body, onDelta, signal) {
  const response = await fetch('/v1/chat/completions', {
    method: 'POST', credentials: 'same-origin', signal,
    headers: headersFor('POST', { 'Content-Type': 'application/json' }),
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch { data = null; }
    if (response.status === 401) signedOut();
    throw new ApiError(response.status, data);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let arm = response.headers.get('x-gateway-experiment-arm');
  let buffer = '';
  let finish = null;
  let id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split('\n')) {
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (data === '[DONE]') return { finish, id, arm };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk);
        id = chunk.id || id;
        if (chunk.experiment) arm = chunk.experiment.arm;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  return { finish, id, arm };
}
