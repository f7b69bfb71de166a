'use strict';
// The admin page: reads /admin/api/{stats,entries,sources}, draws them, and sends the
// three actions (invalidate an entry, invalidate a source, refresh an entry).
//
// Request URLs are built from location.origin + location.pathname, never relative: a page
// opened as http://user:TOKEN@host/admin/ would hand those credentials to every relative
// URL, and Chromium refuses fetch() to a URL that carries credentials. The page's requests
// authenticate with the session cookie set when the page was served, and every mutating
// one carries the CSRF token of the page.

const BASE = location.origin + location.pathname.replace(/[^/]*$/, '');
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const PAGE_SIZE = 50;
let offset = 0;
let timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === 'class') node.className = value;
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

async function api(method, path) {
  const response = await fetch(BASE + path, {
    method, credentials: 'same-origin',
    headers: {'Accept': 'application/json', 'X-CSRF-Token': CSRF},
  });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && (body.detail || body.error);
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

function say(text, isError) {
  const status = document.getElementById('status');
  status.textContent = text;
  status.className = isError ? 'error' : '';
}

// -- formatting ----------------------------------------------------------------------------

const pct = (x) => (x === null || x === undefined ? '–' : `${(100 * x).toFixed(1)}%`);
const num = (x) => (x === null || x === undefined ? '–' : Math.round(x).toLocaleString());

function secs(x) {
  if (x === null || x === undefined) return '–';
  const a = Math.abs(x);
  if (a < 1) return `${(x * 1000).toFixed(0)} ms`;
  if (a < 120) return `${x.toFixed(1)} s`;
  if (a < 7200) return `${(x / 60).toFixed(1)} min`;
  return `${(x / 3600).toFixed(1)} h`;
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}

const until = (t, now) => (t === undefined ? '–' : (t > now ? `in ${secs(t - now)}` : 'passed'));
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : '–');
const worker = (w) => (w && w.host ? `${w.host}:${w.pid}` : '–');

function params(p) {
  if (!p || Object.keys(p).length === 0) return '';
  return Object.entries(p).map(([k, v]) => `${k}=${v}`).join('&');
}

function fill(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  if (rows.length === 0) {
    const columns = document.querySelectorAll(`#${id} thead th`).length;
    rows = [el('tr', {}, el('td', {class: 'empty', colspan: columns}, 'nothing yet'))];
  }
  body.replaceChildren(...rows);
}

// -- actions (each one confirmed) ------------------------------------------------------------

async function act(question, method, path, done) {
  if (!window.confirm(question)) return;
  try {
    const result = await api(method, path);
    say(done(result));
  } catch (err) {
    say(`Failed: ${err.message}`, true);
  }
  await load();
}

function invalidateEntry(e) {
  const what = `${e.source}${params(e.params) ? ' ?' + params(e.params) : ''}`;
  act(`Invalidate this entry of ${what}?\nIt is deleted from memcached; the next read loads it.`,
      'DELETE', `api/entries/${encodeURIComponent(e.id)}`,
      () => `Invalidated one entry of ${what}.`);
}

function refreshEntry(e) {
  act(`Refresh this entry of ${e.source} now, in the background?`, 'POST',
      `api/entries/${encodeURIComponent(e.id)}/refresh`, (r) => `Refresh of ${e.source}: ${r.how}.`);
}

function invalidateSource(s) {
  act(`Invalidate EVERY entry of ${s.name} (${s.entries} listed)?`, 'DELETE',
      `api/sources/${encodeURIComponent(s.name)}`,
      (r) => `Invalidated ${s.name}: ${r.entries} entries deleted.`);
}

// -- drawing ----------------------------------------------------------------------------------

function drawOverview(stats) {
  const totals = {hit: 0, stale: 0, miss: 0, fetches: 0, failed: 0};
  for (const s of Object.values(stats.sources)) {
    totals.hit += s.requests.hit; totals.stale += s.requests.stale; totals.miss += s.requests.miss;
    for (const [outcome, n] of Object.entries(s.refreshes)) {
      totals.fetches += n;
      if (outcome === 'error' || outcome === 'timeout') totals.failed += n;
    }
  }
  const requests = totals.hit + totals.stale + totals.miss;
  const up = stats.servers.filter((s) => s.up).length;
  const card = (value, label) => el('div', {class: 'card'},
    el('div', {class: 'value'}, value), el('div', {class: 'label'}, label));
  document.getElementById('overview').replaceChildren(
    card(num(requests), 'requests (this host)'),
    card(pct(requests ? totals.hit / requests : null), 'hit ratio'),
    card(pct(requests ? totals.stale / requests : null), 'served stale'),
    card(pct(requests ? totals.miss / requests : null), 'misses'),
    card(num(totals.fetches), `origin fetches, ${num(totals.failed)} failed`),
    card(`${up} / ${stats.servers.length}`, 'memcached servers up'),
    card(num(stats.refreshes_in_flight), 'refreshes running'),
  );
}

const CHARTS = [
  ['requests', ['hit', 'stale', 'miss'], false], ['misses', ['miss'], false],
  ['origin fetches', ['refresh_ok', 'refresh_failed'], false],
  ['failed fetches', ['refresh_failed'], true], ['lease waits', ['lease_waits'], false],
  ['blocked hub', ['hub_blocked'], true], ['memcached errors', ['memcached_errors'], true],
];

function drawCharts(history) {
  const box = document.getElementById('charts');
  if (!history) { box.replaceChildren(el('p', {class: 'muted'}, 'history unavailable')); return; }
  const ns = 'http://www.w3.org/2000/svg';
  const charts = CHARTS.map(([label, names, bad]) => {
    const values = history.minutes.map((_, i) => names.reduce((a, n) => a + history.series[n][i], 0));
    const top = Math.max(1, ...values);
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('viewBox', `0 0 ${values.length * 4} 48`);
    svg.setAttribute('preserveAspectRatio', 'none');
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', `${label} per minute, last hour`);
    values.forEach((v, i) => {
      const h = v ? Math.max(1, 46 * v / top) : 0;
      const bar = document.createElementNS(ns, 'rect');
      for (const [k, x] of Object.entries({x: i * 4, y: 48 - h, width: 3, height: h})) bar.setAttribute(k, x);
      const tip = document.createElementNS(ns, 'title');
      tip.textContent = `${new Date(history.minutes[i] * 1000).toLocaleTimeString()}: ${v}`;
      bar.append(tip);
      svg.append(bar);
    });
    const last = values[values.length - 1];
    return el('div', {class: bad ? 'chart bad' : 'chart'},
      el('div', {class: 'label'}, el('span', {}, label),
        el('span', {}, `${num(values.reduce((a, b) => a + b, 0))} / h, ${num(last)} this min`)), svg);
  });
  box.replaceChildren(...charts);
}

function drawSources(sources, stats) {
  fill('sources', sources.map((s) => {
    const st = stats.sources[s.name] || {requests: {}, ratios: {}, refreshes: {}, refresh_seconds: {}};
    const r = st.ratios || {};
    const q = st.refresh_seconds || {};
    const fetches = Object.entries(st.refreshes || {}).map(([k, v]) => `${k} ${num(v)}`).join(', ');
    return el('tr', {},
      el('td', {}, el('strong', {}, s.name)),
      el('td', {}, s.front_door === '/v1' ? `/v1 ${s.kind}` : s.kind),
      el('td', {class: 'num'}, num(s.entries)),
      el('td', {class: 'num'}, num(st.requests.total)),
      el('td', {class: 'num'}, `${pct(r.hit)} / ${pct(r.stale)} / ${pct(r.miss)}`),
      el('td', {}, fetches || '–'),
      el('td', {class: 'num'}, `${secs(q.p50)} / ${secs(q.p90)} / ${secs(q.p99)}`),
      el('td', {class: 'num'}, num(st.lease_waits)),
      el('td', {class: 'actions'}, el('button', {type: 'button', class: 'danger',
        onclick: () => invalidateSource(s)}, 'invalidate source')));
  }));
  const select = document.querySelector('#filters select[name=source]');
  const chosen = select.value;
  select.replaceChildren(el('option', {value: ''}, 'all'),
    ...sources.map((s) => el('option', {value: s.name}, s.name)));
  select.value = chosen;
}

function drawEntries(listing) {
  const now = listing.generated_at;
  fill('entries', listing.entries.map((e) => el('tr', {'data-id': e.id, 'data-state': e.state},
    el('td', {}, el('strong', {}, e.source), el('div', {class: 'muted small'}, e.kind)),
    el('td', {}, params(e.params) || el('span', {class: 'muted'}, '(no parameters)'),
      el('div', {class: 'key muted'}, e.key)),
    el('td', {}, el('span', {class: `badge ${e.state}`}, e.state)),
    el('td', {class: 'num'}, secs(e.age)),
    el('td', {class: 'num'}, `${until(e.fresh_until, now)} / ${until(e.stale_until, now)} / ${until(e.error_until, now)}`),
    el('td', {class: 'num'}, bytes(e.size)),
    el('td', {}, el('code', {}, e.etag || '–')),
    el('td', {}, e.tiers.map((t) => (t === 'l1' ? 'this worker\u2019s L1' : t)).join(', ') || '–'),
    el('td', {}, `${e.last_refresh} ${when(e.last_refresh_at)}`,
      el('div', {class: 'muted small'}, worker(e.last_by)),
      e.last_error && e.last_refresh !== 'invalidated' ? el('div', {class: 'err'}, e.last_error) : null),
    el('td', {}, e.lease_holder ? `held by ${worker(e.lease_holder)}` : '–'),
    el('td', {class: 'actions'},
      el('button', {type: 'button', class: 'danger', onclick: () => invalidateEntry(e)}, 'invalidate'),
      ' ',
      el('button', {type: 'button', onclick: () => refreshEntry(e)}, 'refresh')))));
  const last = Math.min(listing.total, listing.offset + listing.entries.length);
  document.getElementById('page').textContent =
    listing.total ? `${listing.offset + 1}–${last} of ${listing.total}` : 'no entries';
  document.getElementById('prev').disabled = listing.offset === 0;
  document.getElementById('next').disabled = last >= listing.total;
  document.getElementById('completeness').textContent =
    `Scope: ${listing.scope}. ${listing.completeness}`;
}

function drawServers(stats) {
  fill('servers', stats.servers.map((s) => el('tr', {},
    el('td', {}, el('code', {}, s.server)),
    el('td', {}, el('span', {class: `badge ${s.up ? 'up' : 'down'}`}, s.up ? 'up' : 'down'),
      s.error ? el('div', {class: 'err'}, s.error) : null),
    el('td', {}, s.breaker),
    el('td', {class: 'num'}, num(s.curr_items)),
    el('td', {class: 'num'}, s.up ? `${bytes(s.bytes)} of ${bytes(s.limit_maxbytes)} (${pct(s.memory_used)})` : '–'),
    el('td', {class: 'num'}, num(s.evictions)),
    el('td', {class: 'num'}, num(s.curr_connections)),
    el('td', {class: 'num'}, pct(s.hit_ratio)),
    el('td', {}, s.version || '–'))));
  fill('tiers', Object.entries(stats.tiers).map(([name, t]) => el('tr', {},
    el('td', {}, name === 'l1' ? 'in-process (L1)' : name),
    el('td', {class: 'num'}, num(t.hits)), el('td', {class: 'num'}, pct(t.share)))));
  fill('errors', stats.errors.map((e) => el('tr', {},
    el('td', {}, when(e.t)), el('td', {}, e.s), el('td', {}, e.o),
    el('td', {class: 'err'}, e.e || ''), el('td', {}, worker({host: e.h, pid: e.pid})))));
  fill('hub', stats.hub.map((h) => el('tr', {},
    el('td', {}, when(h.t)), el('td', {class: 'num'}, secs(h.seconds)),
    el('td', {}, worker({host: h.h, pid: h.pid})),
    el('td', {}, el('details', {}, el('summary', {}, h.greenlet || 'stack'), el('pre', {}, h.stack || ''))))));
}

// -- loading ------------------------------------------------------------------------------------

function entryQuery() {
  const form = new FormData(document.getElementById('filters'));
  const query = new URLSearchParams({offset: String(offset), limit: String(PAGE_SIZE)});
  for (const name of ['source', 'state', 'q']) if (form.get(name)) query.set(name, form.get(name));
  return query.toString();
}

async function load() {
  try {
    const [stats, sources, listing] = await Promise.all([
      api('GET', 'api/stats'), api('GET', 'api/sources'), api('GET', `api/entries?${entryQuery()}`)]);
    drawOverview(stats);
    drawCharts(stats.history);
    drawSources(sources, stats);
    drawEntries(listing);
    drawServers(stats);
    document.getElementById('answered').textContent =
      `answered by ${worker(listing.answered_by)} at ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = 'yes';
  } catch (err) {
    say(`Could not load: ${err.message}`, true);
  }
}

function schedule() {
  clearInterval(timer);
  if (document.getElementById('auto').checked) timer = setInterval(load, 5000);
}

document.getElementById('reload').addEventListener('click', load);
document.getElementById('auto').addEventListener('change', schedule);
document.getElementById('prev').addEventListener('click', () => { offset = Math.max(0, offset - PAGE_SIZE); load(); });
document.getElementById('next').addEventListener('click', () => { offset += PAGE_SIZE; load(); });
document.getElementById('filters').addEventListener('change', () => { offset = 0; load(); });
document.getElementById('filters').addEventListener('submit', (ev) => { ev.preventDefault(); offset = 0; load(); });
load();
schedule();
