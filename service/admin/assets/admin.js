'use strict';
// The admin page: reads /admin/api/{stats,entries,sources}, draws them, and sends the
// three actions (invalidate an entry, invalidate a source, refresh an entry).
//
// Request URLs are built from location.origin and the admin's own path (the admin-base
// meta, /admin/ by default), never relative: a page opened as
// http://user:TOKEN@host/admin/ would hand those credentials to every relative URL, and
// Chromium refuses fetch() to a URL that carries credentials. The page's requests
// authenticate with the session cookie set when the page was served, and every mutating
// one carries the CSRF token of the page. The timed reloads (every 5 s) carry
// X-SWR-Admin-Poll: 1, and the access log leaves them out.
//
// Two views: the fleet (/admin/) and one entry (/admin/entries/<id>, the entry-id meta),
// a URL to share; each row of the list links to its entry's page.

const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
const BASE = location.origin + meta('admin-base');
const CSRF = meta('csrf-token');
const ENTRY = meta('entry-id');
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

async function api(method, path, poll) {
  const headers = {'Accept': 'application/json', 'X-CSRF-Token': CSRF};
  if (poll) headers['X-SWR-Admin-Poll'] = '1';
  const response = await fetch(BASE + path, {method, credentials: 'same-origin', headers});
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
const hhmm = (t) => new Date(t * 1000).toLocaleTimeString([], {hour: '2-digit', minute: '2-digit', hourCycle: 'h23'});
// What each state and fetch outcome is called on the page (the API's names otherwise).
const LABELS = {client_error: '4xx', error_only: 'error only'};
const label = (name) => LABELS[name] || name;
const entryUrl = (e) => `${BASE}entries/${encodeURIComponent(e.id)}`;
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
        el('span', {}, `${num(values.reduce((a, b) => a + b, 0))} / h, ${num(last)} this min`)),
      el('div', {class: 'plot'}, el('div', {class: 'yaxis', 'aria-hidden': 'true'},
        el('span', {}, num(top)), el('span', {}, '0')), svg),
      timeAxis(history.minutes));
  });
  box.replaceChildren(...charts);
}

// Three labelled times under a chart (its first minute, the middle one, the last), each
// under its minute's bar: the charts are narrow, more labels would run into each other.
function timeAxis(minutes) {
  const n = minutes.length;
  const ticks = n ? [...new Set([0, Math.floor(n / 2), n - 1])] : [];
  return el('div', {class: 'xaxis', 'aria-label': 'time'}, ticks.map((i) => {
    const tick = el('span', {class: i === 0 ? 'first' : (i === n - 1 ? 'last' : '')}, hhmm(minutes[i]));
    tick.style.left = `${100 * i / n}%`;  // CSSOM: the page's CSP refuses style attributes
    return tick;
  }));
}

// Percentiles of the observed fetch times when the registry has some; else the bucket
// bounds of this host's histogram, shown as bounds ("≤ 2.5 s"), never as a value.
function fetchTimes(name, stats) {
  const seen = (stats.fetch_seconds || {})[name];
  if (seen && seen.count) {
    return el('span', {title: `observed: the last fetch of ${seen.count} listed entries, whole fleet`},
      `${secs(seen.p50)} / ${secs(seen.p90)} / ${secs(seen.p99)}`);
  }
  const b = (stats.sources[name] || {}).refresh_seconds || {};
  if (!b.count) return '–';
  const bound = (x) => (x === null || x === undefined ? `> ${secs(b.over)}` : `≤ ${secs(x)}`);
  return el('span', {title: 'bounds of this host\u2019s histogram buckets: each percentile lies at or under it'},
    `${bound(b.p50)} / ${bound(b.p90)} / ${bound(b.p99)}`);
}

function drawSources(sources, stats) {
  fill('sources', sources.map((s) => {
    const st = stats.sources[s.name] || {requests: {}, ratios: {}, refreshes: {}, refresh_seconds: {}};
    const r = st.ratios || {};
    const fetches = Object.entries(st.refreshes || {}).map(([k, v]) => `${label(k)} ${num(v)}`).join(', ');
    return el('tr', {},
      el('td', {}, el('strong', {}, s.name)),
      el('td', {}, s.front_door === '/v1' ? `/v1 ${s.kind}` : s.kind),
      el('td', {class: 'num'}, num(s.entries)),
      el('td', {class: 'num'}, num(st.requests.total)),
      el('td', {class: 'num'}, `${pct(r.hit)} / ${pct(r.stale)} / ${pct(r.miss)}`),
      el('td', {}, fetches || '–'),
      el('td', {class: 'num'}, fetchTimes(s.name, stats)),
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
    el('td', {}, el('a', {href: entryUrl(e), class: 'entry-link'},
      params(e.params) || el('span', {class: 'muted'}, '(no parameters)')),
      el('div', {class: 'key muted'}, e.key)),
    el('td', {}, el('span', {class: `badge ${e.state}`}, label(e.state))),
    el('td', {class: 'num'}, secs(e.age)),
    el('td', {class: 'num'}, `${until(e.fresh_until, now)} / ${until(e.stale_until, now)} / ${until(e.error_until, now)}`),
    el('td', {class: 'num'}, bytes(e.size)),
    el('td', {}, el('code', {}, e.etag || '–')),
    el('td', {}, e.tiers.map((t) => (t === 'l1' ? 'this worker\u2019s L1' : t)).join(', ') || '–'),
    el('td', {}, `${label(e.last_refresh)} ${when(e.last_refresh_at)}`,
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

async function load(poll) {
  if (ENTRY) { await loadEntry(poll); return; }
  try {
    const [stats, sources, listing] = await Promise.all([
      api('GET', 'api/stats', poll), api('GET', 'api/sources', poll),
      api('GET', `api/entries?${entryQuery()}`, poll)]);
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

// -- one entry's page ---------------------------------------------------------------------------

let shown = null;

function drawEntry(e) {
  shown = e;
  const now = e.generated_at;
  const at = (t) => (t === undefined ? '–' : `${new Date(t * 1000).toLocaleString()} (${until(t, now)})`);
  const facts = [
    ['source', `${e.source} (${e.kind})`], ['parameters', params(e.params) || '(none)'],
    ['key', el('code', {}, e.key)], ['id', el('code', {}, e.id)],
    ['state', el('span', {class: `badge ${e.state}`}, label(e.state))],
    ['age', secs(e.age)],
    ['stored', e.stored_at === undefined ? '–' : new Date(e.stored_at * 1000).toLocaleString()],
    ['fresh until', at(e.fresh_until)], ['stale until', at(e.stale_until)],
    ['error until', at(e.error_until)], ['size', bytes(e.size)],
    ['ETag', el('code', {}, e.etag || '–')],
    ['tiers', e.tiers.map((t) => (t === 'l1' ? 'this worker\u2019s L1' : t)).join(', ') || '–'],
    ['last fetch', `${label(e.last_refresh)} ${when(e.last_refresh_at)} by ${worker(e.last_by)}`],
    ['last error', e.last_error ? el('span', {class: 'err'}, e.last_error) : '–'],
    ['lease', e.lease_holder ? `held by ${worker(e.lease_holder)}` : '–'],
  ];
  document.getElementById('entry-title').textContent =
    `${e.source}${params(e.params) ? ' ?' + params(e.params) : ''}`;
  document.querySelector('#entry-facts tbody').replaceChildren(
    ...facts.map(([name, value]) => el('tr', {}, el('th', {}, name), el('td', {}, value))));
}

async function loadEntry(poll) {
  document.getElementById('fleet').hidden = true;
  document.getElementById('entry').hidden = false;
  try {
    const e = await api('GET', `api/entries/${encodeURIComponent(ENTRY)}`, poll);
    drawEntry(e);
    document.getElementById('answered').textContent =
      `answered by ${worker(e.answered_by)} at ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = 'yes';
  } catch (err) {
    say(`Could not load entry ${ENTRY}: ${err.message}`, true);
  }
}

function schedule() {
  clearInterval(timer);
  if (document.getElementById('auto').checked) timer = setInterval(() => load(true), 5000);
}

document.getElementById('entry-invalidate').addEventListener('click', () => { if (shown) invalidateEntry(shown); });
document.getElementById('entry-refresh').addEventListener('click', () => { if (shown) refreshEntry(shown); });

document.getElementById('reload').addEventListener('click', () => load(false));
document.getElementById('auto').addEventListener('change', schedule);
document.getElementById('prev').addEventListener('click', () => { offset = Math.max(0, offset - PAGE_SIZE); load(); });
document.getElementById('next').addEventListener('click', () => { offset += PAGE_SIZE; load(); });
document.getElementById('filters').addEventListener('change', () => { offset = 0; load(); });
document.getElementById('filters').addEventListener('submit', (ev) => { ev.preventDefault(); offset = 0; load(); });
load();
schedule();
