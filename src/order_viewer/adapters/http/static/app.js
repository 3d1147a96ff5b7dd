// Order viewer: looks orders up by id over the service's JSON API.
// Every value that comes from the server is put into the page with textContent
// (never innerHTML), so an order containing markup is shown literally.
// When the service requires a token, it is kept in sessionStorage (this tab only) and sent in
// the Authorization header; it never goes into a URL or the page.

const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
const RECENT_LIMIT = 20;
const TIMEOUT_MS = 15000;
const TOKEN_KEY = 'order-viewer.token';

const byId = (id) => document.getElementById(id);
const ui = {
  form: byId('lookup'),
  input: byId('order-id'),
  status: byId('status'),
  retry: byId('retry'),
  main: byId('order'),
  view: byId('order-view'),
  empty: byId('empty'),
  title: byId('order-title'),
  titleId: byId('order-title-id'),
  summary: byId('summary'),
  delivery: byId('delivery'),
  payment: byId('payment'),
  items: byId('items'),
  itemsCaption: byId('items-caption'),
  rawToggle: byId('raw-toggle'),
  raw: byId('raw-json'),
  recent: document.querySelector('[data-testid="recent-orders"]'),
  recentList: byId('recent-list'),
  recentStatus: byId('recent-status'),
  recentRefresh: byId('recent-refresh'),
  signIn: byId('sign-in'),
  token: byId('token'),
  signOut: byId('sign-out'),
  maskedNote: byId('masked-note'),
};

let currentId = null; // the order shown, or being loaded
let generation = 0; // bumps on every lookup; stale answers are dropped
let inflight = null; // AbortController of the running lookup
let retryAction = null;
let recentLoading = false;
let afterSignIn = null; // what to do again once a token is given

// ---------------------------------------------------------------- credentials

function storedToken() {
  try {
    return window.sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null; // storage disabled: the token cannot be kept, the user is asked each time
  }
}

function storeToken(token) {
  try {
    if (token === null) window.sessionStorage.removeItem(TOKEN_KEY);
    else window.sessionStorage.setItem(TOKEN_KEY, token);
  } catch {
    // nothing to do: see storedToken
  }
  ui.signOut.hidden = storedToken() === null;
}

function api(path, signal) {
  const headers = { Accept: 'application/json' };
  const token = storedToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  return fetch(path, { headers, signal, cache: 'no-store' });
}

// The service refused `sentToken` (null: the request carried none): forget it and ask for one.
function askForToken(then, sentToken) {
  const current = storedToken();
  if (current !== null && current !== sentToken) return; // signed in again since it was sent
  const alreadyAsking = !ui.signIn.hidden;
  storeToken(null);
  if (then) afterSignIn = then;
  ui.signIn.hidden = false;
  // A late refusal of a request sent without a token tells nothing new, and must not hide what
  // the form said last (why a typed token was refused, or that the user signed out).
  if (alreadyAsking && sentToken === null) return;
  ui.token.focus();
  setStatus('auth', sentToken
    ? 'The token was not accepted (expired, revoked or mistyped). Please sign in again.'
    : 'This service needs an access token to show orders. Please sign in.');
}

// ---------------------------------------------------------------- formatting

const dateFormat = new Intl.DateTimeFormat(undefined, {
  year: 'numeric', month: 'short', day: 'numeric',
  hour: '2-digit', minute: '2-digit', second: '2-digit', timeZoneName: 'short',
});
const shortDateFormat = new Intl.DateTimeFormat(undefined, {
  month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
});
const moneyFormats = new Map();

function moneyFormat(currency) {
  const code = typeof currency === 'string' ? currency.trim().toUpperCase() : '';
  if (!moneyFormats.has(code)) {
    let format = null;
    if (/^[A-Z]{3}$/.test(code)) {
      try {
        format = new Intl.NumberFormat(undefined, { style: 'currency', currency: code });
      } catch {
        format = null;
      }
    }
    moneyFormats.set(code, format);
  }
  return moneyFormats.get(code);
}

// `minor` is an integer in the currency's minor unit (cents for USD, yen for JPY).
function money(minor, currency) {
  if (typeof minor !== 'number' || !Number.isFinite(minor)) return null;
  const format = moneyFormat(currency);
  if (format) {
    const digits = format.resolvedOptions().maximumFractionDigits ?? 2;
    return format.format(minor / 10 ** digits);
  }
  // A code Intl cannot use: assume two minor digits (the ISO 4217 default) and show the code as given.
  const plain = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 })
    .format(minor / 100);
  return typeof currency === 'string' && currency ? `${plain} ${currency}` : plain;
}

function toDate(value) {
  let date = null;
  if (typeof value === 'string' && value) date = new Date(value);
  else if (typeof value === 'number' && Number.isFinite(value)) date = new Date(value * 1000);
  return date && !Number.isNaN(date.getTime()) ? date : null;
}

function timeNode(value, format = dateFormat) {
  const date = toDate(value);
  if (!date) return value === undefined || value === null || value === '' ? null : String(value);
  const node = document.createElement('time');
  node.dateTime = date.toISOString();
  node.title = date.toISOString();
  node.textContent = format.format(date);
  return node;
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

// ---------------------------------------------------------------- DOM helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('data-') || key.startsWith('aria-')) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// Fills a <dd> with a value: a node, or text; empty values show a dash.
function fillValue(target, value, mono = false) {
  if (value instanceof Node) {
    target.append(value);
  } else if (value === null || value === undefined || value === '') {
    target.textContent = '—';
    target.classList.add('none');
  } else {
    target.textContent = String(value);
  }
  if (mono) target.classList.add('mono');
}

function fields(dl, rows) {
  const nodes = [];
  for (const [label, value, mono] of rows) {
    const dd = el('dd');
    fillValue(dd, value, mono);
    nodes.push(el('div', { class: 'field' }, el('dt', { text: label }), dd));
  }
  dl.replaceChildren(...nodes);
}

const obj = (value) => (value && typeof value === 'object' && !Array.isArray(value) ? value : {});

// ---------------------------------------------------------------- rendering

function renderOrder(order) {
  const delivery = obj(order.delivery);
  const payment = obj(order.payment);
  const items = Array.isArray(order.items) ? order.items : [];
  const currency = payment.currency;

  ui.titleId.textContent = String(order.order_uid ?? currentId ?? '');

  fields(ui.summary, [
    ['Order ID', order.order_uid, true],
    ['Track number', order.track_number, true],
    ['Created', timeNode(order.date_created)],
    ['Customer', order.customer_id],
    ['Delivery service', order.delivery_service],
    ['Entry', order.entry],
    ['Locale', order.locale],
  ]);

  const address = [delivery.address, delivery.city, delivery.region, delivery.zip]
    .filter((part) => part !== undefined && part !== null && part !== '')
    .map(String)
    .join(', ');
  fields(ui.delivery, [
    ['Name', delivery.name],
    ['Phone', delivery.phone],
    ['Address', address],
    ['Email', delivery.email],
  ]);

  fields(ui.payment, [
    ['Amount', money(payment.amount, currency)],
    ['Goods', money(payment.goods_total, currency)],
    ['Delivery cost', money(payment.delivery_cost, currency)],
    ['Customs fee', money(payment.custom_fee, currency)],
    ['Currency', currency],
    ['Provider', payment.provider],
    ['Bank', payment.bank],
    ['Paid at', timeNode(payment.payment_dt)],
    ['Transaction', payment.transaction, true],
  ]);

  ui.itemsCaption.textContent = `Items of order ${ui.titleId.textContent}: ${plural(items.length, 'item', 'items')}`;
  const rows = items.map((raw) => {
    const item = obj(raw);
    const cell = (label, value, cls = '') => {
      const td = el('td', { class: cls, 'data-label': label });
      fillValue(td, value);
      return td;
    };
    const sale = typeof item.sale === 'number' ? `${item.sale}%` : item.sale;
    return el('tr', {},
      cell('Name', item.name, 'name'),
      cell('Brand', item.brand),
      cell('Size', item.size),
      cell('Price', money(item.price, currency), 'num'),
      cell('Sale', sale, 'num'),
      cell('Total', money(item.total_price, currency), 'num'),
      cell('Status', item.status, 'num'));
  });
  if (rows.length === 0) {
    rows.push(el('tr', {}, el('td', { colSpan: 7, class: 'none', text: 'This order has no items.' })));
  }
  ui.items.replaceChildren(...rows);

  ui.raw.textContent = JSON.stringify(order, null, 2);
}

function showView(visible) {
  ui.view.hidden = !visible;
  ui.empty.hidden = visible;
}

function setBusy(busy) {
  ui.main.classList.toggle('is-loading', busy);
  if (busy) ui.main.setAttribute('aria-busy', 'true');
  else ui.main.removeAttribute('aria-busy');
}

function setStatus(state, message, retry = null) {
  ui.status.dataset.state = state;
  ui.status.textContent = message;
  retryAction = retry;
  ui.retry.hidden = !retry;
}

function markCurrentInRecent() {
  for (const link of ui.recentList.querySelectorAll('a[data-order-uid]')) {
    if (link.dataset.orderUid === currentId) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

// ---------------------------------------------------------------- history

function idFromUrl() {
  const id = new URLSearchParams(window.location.search).get('id');
  return id === null || id === '' ? null : id;
}

function updateHistory(id, how) {
  if (how === 'none') return;
  const target = `${window.location.pathname}?id=${encodeURIComponent(id)}`;
  const here = window.location.pathname + window.location.search;
  if (how === 'push' && target !== here) window.history.pushState({ id }, '', target);
  else window.history.replaceState({ id }, '', target);
}

// ---------------------------------------------------------------- lookups

async function readJson(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function retryAfterSeconds(header) {
  if (!header) return null;
  const value = header.trim();
  if (/^\d+$/.test(value)) return Number(value);
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

function cancelLookup() {
  generation += 1;
  if (inflight) inflight.abort();
  inflight = null;
  setBusy(false);
}

function rejectId(id, serverMessage = '') {
  ui.input.setAttribute('aria-invalid', 'true');
  const shown = id.length > 80 ? `${id.slice(0, 80)}…` : id;
  const why = serverMessage ? ` (server: ${serverMessage})` : '';
  setStatus('bad-id', id === ''
    ? 'Enter an order ID first.'
    : `“${shown}” is not a valid order ID${why}. An ID has 1–64 letters, digits, “_” or “-”.`);
}

// how: 'push' (new history entry), 'replace' (rewrite the current one), 'none' (back/forward).
async function showOrder(rawId, how, { focus = false } = {}) {
  const id = String(rawId ?? '').trim();
  ui.input.value = id;
  if (!ID_PATTERN.test(id)) {
    cancelLookup();
    rejectId(id);
    return;
  }
  ui.input.removeAttribute('aria-invalid');
  updateHistory(id, how);

  cancelLookup();
  const mine = generation;
  const controller = new AbortController();
  inflight = controller;
  const timer = window.setTimeout(() => controller.abort(), TIMEOUT_MS);
  currentId = id;
  markCurrentInRecent();
  setBusy(true);
  setStatus('loading', `Loading order ${id}…`);

  let response = null;
  let body = null;
  let failure = null;
  const sentToken = storedToken();
  try {
    response = await api(`/order/${encodeURIComponent(id)}`, controller.signal);
    body = await readJson(response);
  } catch (error) {
    failure = error;
  } finally {
    window.clearTimeout(timer);
  }
  if (mine !== generation) return; // a newer lookup took over
  inflight = null;
  setBusy(false);
  const retry = () => showOrder(id, 'none');

  if (failure) {
    showView(false);
    const why = failure.name === 'AbortError'
      ? 'The server did not answer in time.'
      : 'The server could not be reached (network error).';
    setStatus('unavailable', `${why} The order service may be down; please try again in a moment.`, retry);
    return;
  }
  if (response.ok && body && typeof body === 'object') {
    try {
      renderOrder(body);
      // The service tags the masked view of an order apart from the whole one.
      const masked = (response.headers.get('ETag') || '').endsWith('-masked"');
      ui.maskedNote.hidden = !masked;
      for (const dd of ui.delivery.querySelectorAll('dd')) dd.classList.toggle('masked', masked);
    } catch {
      showView(false);
      setStatus('error', `Order ${id} could not be displayed: the server sent unexpected data.`, retry);
      return;
    }
    showView(true);
    document.title = `Order ${id} · Order viewer`;
    setStatus('loaded', `Showing order ${id}.`);
    if (focus) ui.title.focus();
    return;
  }
  showView(false);
  document.title = 'Order viewer';
  const serverMessage = body && typeof body.error === 'string' ? body.error : '';
  if (response.status === 401) {
    askForToken(retry, sentToken);
  } else if (response.status === 403) {
    setStatus('error', 'Your token does not allow reading orders (it lacks the orders:read scope).');
  } else if (response.status === 429) {
    const wait = retryAfterSeconds(response.headers.get('Retry-After'));
    setStatus('error', `Too many failed sign-ins from this address. Please try again in ${plural(wait ?? 60, 'second', 'seconds')}.`, retry);
  } else if (response.status === 404) {
    setStatus('not-found', `Order ${id} was not found. Check the ID, or try again later if it was sent just now.`);
  } else if (response.status === 400) {
    rejectId(id, serverMessage);
  } else if (response.status === 503) {
    const wait = retryAfterSeconds(response.headers.get('Retry-After'));
    const when = wait ? ` in ${plural(wait, 'second', 'seconds')}` : ' in a moment';
    setStatus('unavailable',
      `The service is temporarily unavailable (its database or its sign-in provider cannot be reached). Please try again${when}.`, retry);
  } else {
    setStatus('error', `The server could not answer (HTTP ${response.status}). Please try again.`, retry);
  }
}

function clearOrder() {
  cancelLookup();
  currentId = null;
  markCurrentInRecent();
  showView(false);
  ui.input.value = '';
  ui.input.removeAttribute('aria-invalid');
  document.title = 'Order viewer';
  setStatus('idle', 'Enter an order ID, or pick one of the recent orders.');
}

// ---------------------------------------------------------------- recent orders

function recentEntry(order) {
  const uid = String(order.order_uid);
  const count = typeof order.item_count === 'number' ? plural(order.item_count, 'item', 'items') : null;
  const amount = money(order.amount, order.currency);
  const when = timeNode(order.date_created, shortDateFormat);
  const meta = el('span', { class: 'r-meta' });
  for (const part of [when, order.customer_id ? String(order.customer_id) : null]) {
    if (part === null) continue;
    if (meta.childNodes.length) meta.append(' · ');
    meta.append(part);
  }
  const link = el('a', {
    href: `/?id=${encodeURIComponent(uid)}`,
    'data-testid': 'recent-order',
    'data-order-uid': uid,
  },
  el('span', { class: 'r-id mono', text: uid }),
  meta,
  el('span', { class: 'r-amount', text: [amount, count].filter(Boolean).join(' · ') }));
  if (uid === currentId) link.setAttribute('aria-current', 'page');
  return el('li', {}, link);
}

async function loadRecent() {
  if (recentLoading) return;
  recentLoading = true;
  ui.recent.dataset.state = 'loading';
  ui.recentList.setAttribute('aria-busy', 'true');
  const controller = new AbortController();
  const timer = window.setTimeout(() => controller.abort(), TIMEOUT_MS);
  let status = 0;
  const sentToken = storedToken();
  try {
    const response = await api(`/orders?limit=${RECENT_LIMIT}`, controller.signal);
    status = response.status;
    const body = await readJson(response);
    if (!response.ok || !body || !Array.isArray(body.orders)) throw new Error(`HTTP ${status}`);
    const orders = body.orders.filter((o) => o && typeof o === 'object' && o.order_uid != null);
    ui.recentList.replaceChildren(...orders.map(recentEntry));
    ui.recent.dataset.state = 'loaded';
    ui.recentStatus.textContent = orders.length ? '' : 'No orders yet.';
  } catch {
    ui.recent.dataset.state = 'error';
    ui.recentList.replaceChildren();
    if (status === 401) {
      ui.recentStatus.textContent = 'Sign in to see the recent orders.';
      askForToken(null, sentToken);
    } else {
      ui.recentStatus.textContent = status === 503
        ? 'Recent orders are unavailable right now (database or sign-in provider unreachable). Use Refresh to try again.'
        : 'Recent orders could not be loaded. Use Refresh to try again.';
    }
  } finally {
    window.clearTimeout(timer);
    ui.recentList.removeAttribute('aria-busy');
    recentLoading = false;
  }
}

// ---------------------------------------------------------------- wiring

ui.form.addEventListener('submit', (event) => {
  event.preventDefault();
  showOrder(ui.input.value, 'push');
});

ui.input.addEventListener('input', () => ui.input.removeAttribute('aria-invalid'));

ui.retry.addEventListener('click', () => {
  if (retryAction) retryAction();
});

ui.rawToggle.addEventListener('click', () => {
  const open = ui.rawToggle.getAttribute('aria-expanded') !== 'true';
  ui.rawToggle.setAttribute('aria-expanded', String(open));
  ui.rawToggle.textContent = open ? 'Hide raw JSON' : 'Show raw JSON';
  ui.raw.hidden = !open;
});

ui.recentRefresh.addEventListener('click', () => loadRecent());

ui.signIn.addEventListener('submit', (event) => {
  event.preventDefault();
  const token = ui.token.value.trim();
  ui.token.value = ''; // out of the page at once
  if (!token) {
    setStatus('auth', 'Enter an access token first.');
    ui.token.focus();
    return;
  }
  // What a bearer token may hold; fetch() throws on a header beyond Latin-1, and the page would
  // then fail as if the network were down until sign-out.
  if (!/^[\x21-\x7e]+$/.test(token)) {
    setStatus('auth', 'That is not an access token: a token has only letters, digits and punctuation, without spaces. Please paste it again.');
    ui.token.focus();
    return;
  }
  storeToken(token);
  ui.signIn.hidden = true;
  const then = afterSignIn;
  afterSignIn = null;
  if (then) then();
  else setStatus('idle', 'Signed in. Enter an order ID, or pick one of the recent orders.');
  loadRecent();
  ui.input.focus();
});

ui.signOut.addEventListener('click', () => {
  storeToken(null);
  clearOrder();
  ui.recentList.replaceChildren();
  ui.recentStatus.textContent = 'Sign in to see the recent orders.';
  afterSignIn = null;
  ui.signIn.hidden = false;
  ui.token.focus();
  setStatus('auth', 'Signed out: the token is forgotten. Sign in to see orders again.');
});

ui.recentList.addEventListener('click', (event) => {
  const link = event.target instanceof Element ? event.target.closest('a[data-order-uid]') : null;
  if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  event.preventDefault();
  showOrder(link.dataset.orderUid, 'push', { focus: true });
});

window.addEventListener('popstate', () => {
  const id = idFromUrl();
  if (id === null) clearOrder();
  else showOrder(id, 'none');
});

ui.signOut.hidden = storedToken() === null;
const initial = idFromUrl();
if (initial !== null) showOrder(initial, 'replace');
loadRecent();
ui.input.focus();
