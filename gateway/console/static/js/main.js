// The console's entry point: the session check, the sign-in screen and the hash router.
import { loadSession, onSignedOut, signOut } from './api.js';
import { message } from './dom.js';
import * as overview from './overview.js';
import * as adapters from './adapters.js';
import * as training from './training.js';
import * as experiments from './experiments.js';
import * as playground from './playground.js';

const PAGES = { overview, adapters, training, experiments, playground };
const SIGN_IN_MESSAGES = {
  failed: 'That key is not the admin key.',
  throttled: 'Too many failed sign-ins from this address: wait a minute and try again.',
  'foreign-origin': 'Sign-in refused: the form was posted from another site.',
  'signed-out': 'Signed out.',
  expired: 'Your session ended: sign in again.',
};
let current = null;

function showSignIn(reason) {
  document.getElementById('app').hidden = true;
  document.getElementById('nav').hidden = true;
  document.getElementById('sign-in').hidden = false;
  if (current) { PAGES[current].hide?.(); current = null; }
  const text = SIGN_IN_MESSAGES[reason] || '';
  message(document.getElementById('sign-in-message'), text, reason === 'signed-out' ? 'ok' : 'error');
  document.getElementById('admin-key').focus();
}

function route() {
  const name = (location.hash.replace(/^#\//, '').split('?')[0]) || 'overview';
  const page = PAGES[name] ? name : 'overview';
  if (current && current !== page) PAGES[current].hide?.();
  for (const section of document.querySelectorAll('.page')) section.hidden = section.id !== `page-${page}`;
  for (const link of document.querySelectorAll('#nav a')) link.classList.toggle('active', link.dataset.page === page);
  const params = new URLSearchParams(location.hash.split('?')[1] || '');
  if (current !== page) PAGES[page].show(document.getElementById(`page-${page}`), params);
  else PAGES[page].update?.(params);
  current = page;
}

async function start() {
  const query = new URLSearchParams(location.search);
  const reason = query.get('signin');
  if (reason) history.replaceState(null, '', location.pathname + location.hash);
  onSignedOut(() => showSignIn('expired'));
  document.getElementById('sign-out').addEventListener('click', async () => {
    await signOut().catch(() => {});
    showSignIn('signed-out');
  });
  if (!(await loadSession())) { showSignIn(reason); return; }
  document.getElementById('sign-in').hidden = true;
  document.getElementById('nav').hidden = false;
  document.getElementById('app').hidden = false;
  window.addEventListener('hashchange', route);
  route();
}

start();
