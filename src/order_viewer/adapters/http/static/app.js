// Order viewer: looks orders up by id over the service's JSON API.
// Every value that comes from the server is put into the page with textContent
// (never innerHTML), so an order containing markup is shown literally.
// When the service requires a token, it is kept in sessionStorage (this tab only) and sent in
// the Authorization header; it never goes into a URL or the page.
// The order shown is kept current by its event stream (GET /order/{id}/events), read with
// fetch() rather than EventSource, which cannot send the Authorization header.

const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
const RECENT_LIMIT = 20;
const TIMEOUT_MS = 15000;
const TOKEN_KEY = 'order-viewer.token';
const LIVE_RETRY_MAX_MS = 30000;
// A stream's unfinished event larger than this is no event of ours: the stream is dropped.
const LIVE_MAX_PENDING = 16 * 1024 * 1024;
const HISTORY_PAGE = 50;

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
  live: byId('live'),
  history: byId('history'),
  historyRows: byId('history-rows'),
  historyStatus: byId('history-status'),
  historyMore: byId('history-more'),
};

let currentId = null; // the order shown, or being loaded
let generation = 0; // bumps on every lookup; stale answers are dropped
let inflight = null; // AbortController of the running lookup
let retryAction = null;
let recentLoading = false;
let afterSignIn = null; // what to do again once a token is given
let watch = null; // the event stream of the order shown: see watchOrder
let historyNext = null; // the cursor of the history's next page, or null

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
const clockFormat = new Intl.DateTimeFormat(undefined, {
  hour: '2-digit', minute: '2-digit', second: '2-digit',
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

// The order in the page, masked or whole as the service sent it.
function showRendered(order, masked) {
  renderOrder(order);
  ui.maskedNote.hidden = !masked;
  for (const dd of ui.delivery.querySelectorAll('dd')) dd.classList.toggle('masked', masked);
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
  stopWatching();
  ui.history.hidden = true;
  ui.view.classList.remove('is-deleted');
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
      // The service tags the masked view of an order apart from the whole one.
      showRendered(body, (response.headers.get('ETag') || '').endsWith('-masked"'));
    } catch {
      showView(false);
      setStatus('error', `Order ${id} could not be displayed: the server sent unexpected data.`, retry);
      return;
    }
    showView(true);
    document.title = `Order ${id} · Order viewer`;
    setStatus('loaded', `Showing order ${id}.`);
    if (focus) ui.title.focus();
    watchOrder(id);
    loadHistory(id, null);
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
    explainNotFound(id, mine);
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

// ---------------------------------------------------------------- live updates

// The Server-Sent Events of a stream's body, as they come: `onEvent({ type, id, data })`.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += value;
    let end;
    while ((end = pending.search(/\r\n\r\n|\n\n|\r\r/)) !== -1) {
      const block = pending.slice(0, end);
      pending = pending.slice(end).replace(/^(\r\n\r\n|\n\n|\r\r)/, '');
      const event = { type: 'message', id: null, data: [] };
      for (const line of block.split(/\r\n|\n|\r/)) {
        if (line === '' || line.startsWith(':')) continue; // a comment: the heartbeat
        const colon = line.indexOf(':');
        const field = colon === -1 ? line : line.slice(0, colon);
        const text = colon === -1 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') event.type = text;
        else if (field === 'id') event.id = text;
        else if (field === 'data') event.data.push(text);
      }
      if (event.data.length) onEvent({ type: event.type, id: event.id, data: event.data.join('\n') });
    }
    if (pending.length > LIVE_MAX_PENDING) throw new Error('event too large');
  }
}

// An event's id: the offset of the message its version came from, which only grows for one
// order. BigInt, as offsets may pass 2^53.
function eventOffset(id) {
  return typeof id === 'string' && /^\d{1,19}$/.test(id) ? BigInt(id) : null;
}

function sayLive(state, message) {
  ui.live.dataset.state = state;
  ui.live.textContent = message;
  ui.live.hidden = false;
}

function stopWatching() {
  if (!watch) return;
  watch.stopped = true;
  if (watch.controller) watch.controller.abort();
  window.clearTimeout(watch.timer);
  watch = null;
  ui.live.hidden = true;
  ui.live.textContent = '';
}

// Keep the order shown current: its stream replaces it by each newer version and says when it
// is deleted. After a loss the stream is opened again with Last-Event-ID, the offset of the
// version on screen, so the server sends only a newer one; and any event whose offset is not
// above it is dropped here as well, so the page never goes back to an older version.
function watchOrder(id) {
  stopWatching();
  watch = {
    id, offset: null, deleted: false, attempts: 0, stopped: false, controller: null, timer: null,
  };
  connectWatch(watch);
}

async function connectWatch(mine) {
  const controller = new AbortController();
  mine.controller = controller;
  const headers = { Accept: 'text/event-stream' };
  const token = storedToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (mine.offset !== null) headers['Last-Event-ID'] = mine.offset.toString();
  let wait = null;
  try {
    const response = await fetch(`/order/${encodeURIComponent(mine.id)}/events`, {
      headers, signal: controller.signal, cache: 'no-store',
    });
    // Refused for the token or the id: the lookups say why; trying again would not help.
    if ([400, 401, 403, 404].includes(response.status)) return;
    if (response.ok && response.body) {
      mine.attempts = 0;
      await readEvents(response.body, (event) => {
        if (!mine.stopped) liveEvent(mine, event);
      });
    } else {
      wait = retryAfterSeconds(response.headers.get('Retry-After'));
    }
  } catch {
    // the connection was lost, or the watch stopped: below
  }
  if (mine.stopped || watch !== mine) return;
  mine.attempts += 1;
  const backoff = Math.min(LIVE_RETRY_MAX_MS, 1000 * 2 ** Math.min(mine.attempts - 1, 5));
  mine.timer = window.setTimeout(() => connectWatch(mine), wait !== null ? wait * 1000 : backoff);
}

function liveEvent(mine, event) {
  const offset = eventOffset(event.id);
  const newer = offset !== null && (mine.offset === null || offset > mine.offset);
  const at = clockFormat.format(new Date());
  if (event.type === 'version' && newer) {
    let order;
    try {
      order = JSON.parse(event.data);
    } catch {
      return;
    }
    mine.offset = offset;
    // The first event of a stream is the version stored now, mostly the one on screen already.
    if (!mine.deleted && JSON.stringify(order, null, 2) === ui.raw.textContent) return;
    mine.deleted = false;
    showRendered(order, !ui.maskedNote.hidden);
    ui.view.classList.remove('is-deleted');
    sayLive('updated', `Updated at ${at}: a new version of this order was stored.`);
    loadHistory(mine.id, null);
  } else if (event.type === 'deleted' && !mine.deleted && (offset === null || newer)) {
    if (offset !== null) mine.offset = offset;
    mine.deleted = true;
    ui.view.classList.add('is-deleted');
    sayLive('deleted', `This order was deleted (at ${at}); what is shown is its last version.`);
    loadHistory(mine.id, null);
  }
}

// ---------------------------------------------------------------- trails

const OUTCOMES = {
  stored: 'Stored as a new version',
  unchanged: 'Identical redelivery: nothing changed',
  older: 'Older version: ignored',
  dead_lettered: 'Dead-lettered',
  deleted: 'Deleted by a tombstone',
};

// One page of an order's trail: { status, body } (body null unless JSON).
async function fetchTrail(id, limit, after, signal) {
  const query = new URLSearchParams({ limit: String(limit) });
  if (after) query.set('after', after);
  const response = await api(`/order/${encodeURIComponent(id)}/trail?${query}`, signal);
  return { status: response.status, body: await readJson(response) };
}

function clock(value) {
  const date = toDate(value);
  return date ? clockFormat.format(date) : '?';
}

// Why an order is not there, in words, from its trail's state, counts and latest entry; null
// when the trail cannot tell (no such route, or the token may not read trails).
function whyNotFound(id, { status, body }) {
  if (status === 404 && body && typeof body.error === 'string') {
    return `Order ${id} was never seen: no message with this ID has reached the service.`;
  }
  if (status !== 200 || !body || typeof body !== 'object') return null;
  const state = obj(body.state);
  const counts = obj(body.counts);
  const latest = obj(body.latest);
  if (state.status === 'deleted') {
    return `Order ${id} is not stored: it was deleted at ${clock(state.deleted_at)}.`;
  }
  if (state.status === 'stored') {
    return `Order ${id} has just been stored: try again.`;
  }
  const dead = typeof counts.dead_lettered === 'number' ? counts.dead_lettered : 0;
  if (dead > 0) {
    const reason = obj(latest.reason);
    const detail = latest.outcome === 'dead_lettered' && typeof reason.detail === 'string'
      ? ` — ${reason.detail}` : '';
    const last = latest.outcome === 'dead_lettered' ? `, last at ${clock(latest.handled_at)}` : '';
    return `Order ${id} is not stored: dead-lettered ${plural(dead, 'time', 'times')}${last}${detail}.`;
  }
  return `Order ${id} is not stored: its messages were seen, but none was stored.`;
}

async function explainNotFound(id, mine) {
  let answer;
  try {
    answer = await fetchTrail(id, 1, null);
  } catch {
    return; // the not-found message stays
  }
  if (mine !== generation) return;
  const why = whyNotFound(id, answer);
  if (why) setStatus('not-found', why);
}

function historyRow(entry) {
  const item = obj(entry);
  const outcome = String(item.outcome ?? '');
  const reason = obj(item.reason);
  const why = [];
  if (typeof reason.detail === 'string') why.push(`${reason.code ?? ''}: ${reason.detail}`);
  if (typeof item.replayed_from === 'string') why.push(`replayed from ${item.replayed_from}`);
  if (typeof item.sha256 === 'string') why.push(`version ${item.sha256.slice(0, 12)}`);
  const where = `${item.topic ?? '?'} / ${item.partition ?? '?'} / ${item.offset ?? '?'}`;
  const cell = (label, value, cls = '') => {
    const td = el('td', { class: cls, 'data-label': label });
    fillValue(td, value);
    return td;
  };
  return el('tr', { 'data-testid': 'history-entry', 'data-outcome': outcome },
    cell('Handled', timeNode(item.handled_at)),
    cell('What became of it', OUTCOMES[outcome] ?? outcome, `outcome-${outcome}`),
    cell('Message', where, 'mono'),
    cell('Why, or from where', why.join('; ')));
}

// The history panel of the order shown: its first page (after null), or the next one.
async function loadHistory(id, after) {
  const mine = generation;
  ui.historyMore.disabled = true;
  let answer;
  try {
    answer = await fetchTrail(id, HISTORY_PAGE, after);
  } catch {
    answer = null;
  }
  if (mine !== generation || currentId !== id) return;
  ui.historyMore.disabled = false;
  const body = answer && answer.status === 200 ? obj(answer.body) : null;
  if (!body || !Array.isArray(body.entries)) {
    // No trail to show (the token may not read trails, or there is no such route): no panel.
    if (after === null) ui.history.hidden = true;
    else ui.historyStatus.textContent = 'The next entries could not be loaded.';
    return;
  }
  const rows = body.entries.map(historyRow);
  if (after === null) ui.historyRows.replaceChildren(...rows);
  else ui.historyRows.append(...rows);
  historyNext = typeof body.next === 'string' && body.next ? body.next : null;
  ui.historyMore.hidden = historyNext === null;
  const shown = ui.historyRows.childElementCount;
  ui.historyStatus.textContent = historyNext === null
    ? `${plural(shown, 'message', 'messages')}, all shown.`
    : `The oldest ${plural(shown, 'message', 'messages')}; “More” shows the later ones.`;
  ui.history.hidden = false;
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

ui.historyMore.addEventListener('click', () => {
  if (currentId !== null && historyNext !== null) loadHistory(currentId, historyNext);
});

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
