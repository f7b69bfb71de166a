"""The admin API and page: see and steer what is cached.

Enabled only when ``SERVICE_ADMIN_TOKEN`` is set in the environment; otherwise every
``/admin`` route answers 404, as if it did not exist. Requests authenticate with
``Authorization: Bearer <token>``, or HTTP Basic with the token as the password (so a
browser can open the page). Tokens are compared in constant time.

Cross-site requests: a browser sends Basic credentials by itself, so a page elsewhere
could make it send ``DELETE`` here. Mutating requests authenticated with Basic must
therefore carry ``X-CSRF-Token`` (derived from the token and embedded in our page; a
cross-site form cannot set a header without a CORS preflight we never grant), and any
request whose ``Origin`` is not this host is refused.

The entries listed are those this worker has served (each worker knows its own); stats
are merged over every worker when gunicorn runs with the multiprocess metrics directory.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import os
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request

from . import metrics
from .entry import Entry
from .errors import BadRequest, CacheUnavailable, CodecError, NotFound, Unavailable
from .freshness import state
from .lease import lease_key
from .logs import event
from .state import AppState, state_of
from .views import bump_generation, job_for

log = logging.getLogger(__name__)
bp = Blueprint("admin", __name__, url_prefix="/admin")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def csrf_token(token: str) -> str:
    return hmac.new(token.encode(), b"swr-cache admin csrf", hashlib.sha256).hexdigest()


def _presented() -> tuple[str | None, str]:
    auth = request.authorization
    if auth is None:
        return None, ""
    if auth.type == "bearer":
        return auth.token, "bearer"
    if auth.type == "basic":
        return auth.password, "basic"
    return None, ""


@bp.before_request
def authenticate() -> Response | None:
    token: str | None = state_of().extra.get("admin_token")
    if not token:
        raise NotFound("no such route")
    presented, scheme = _presented()
    if presented is None or not hmac.compare_digest(presented.encode(), token.encode()):
        response = jsonify({"error": "unauthorized", "detail": "admin token required"})
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="swr-cache admin"'
        return response
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/") != request.host_url.rstrip("/"):
        return _forbidden(f"cross-origin request from {origin}")
    if request.method not in SAFE_METHODS and scheme == "basic":
        sent = request.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(sent.encode(), csrf_token(token).encode()):
            return _forbidden("X-CSRF-Token missing or wrong")
    return None


def _forbidden(detail: str) -> Response:
    response = jsonify({"error": "forbidden", "detail": detail})
    response.status_code = 403
    return response


@bp.get("/api/stats")
def stats() -> Response:
    return jsonify(collect_stats())


def collect_stats() -> dict[str, Any]:
    """Counters from /metrics, reshaped per source and per tier."""
    out: dict[str, Any] = {"sources": {}, "tiers": {}, "leases": {}, "memcached_errors": {},
                           "refreshes_in_flight": 0.0, "pool_in_use": 0.0}
    for family in metrics.registry().collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "cache_requests_total":
                src = out["sources"].setdefault(labels["source"], {})
                src[labels["result"]] = src.get(labels["result"], 0) + value
            elif name == "cache_refreshes_total":
                src = out["sources"].setdefault(labels["source"], {})
                key = f"refresh_{labels['outcome']}"
                src[key] = src.get(key, 0) + value
            elif name == "cache_tier_hits_total":
                out["tiers"][labels["tier"]] = out["tiers"].get(labels["tier"], 0) + value
            elif name == "cache_lease_total":
                out["leases"][labels["outcome"]] = value
            elif name == "memcached_errors_total":
                out["memcached_errors"][labels["kind"]] = value
            elif name == "cache_refreshes_in_flight":
                out["refreshes_in_flight"] += value
            elif name == "memcached_pool_in_use":
                out["pool_in_use"] += value
    return out


@bp.get("/api/entries")
def entries() -> Response:
    return jsonify(collect_entries())


def collect_entries() -> list[dict[str, Any]]:
    st = state_of()
    known_items = st.ledger.items()
    keys = [key for key, _known in known_items]
    shared: dict[str, Any] = {}
    try:
        shared = st.store.get_many(keys + [lease_key(k) for k in keys])
    except CacheUnavailable:
        pass  # show what this worker has locally
    now = st.clock()
    rows = []
    for key, known in known_items:
        local = st.tiers.local.get(key)
        raw = shared.get(key)
        entry = None
        if raw is not None:
            try:
                entry = Entry.from_wire(raw)
            except CodecError:
                entry = None  # not ours: shown as gone
        if entry is None and local is not None:
            entry = local.entry
        row: dict[str, Any] = {
            "key": key, "source": known.source, "params": known.params,
            "last_refresh": known.last_outcome, "last_refresh_at": known.last_refresh_at,
            "last_error": known.last_error,
            "lease_holder": shared.get(lease_key(key)),
            "in_memcached": raw is not None, "size": len(local.blob) if local else None,
        }
        if entry is not None:
            t = entry.timing
            row.update(state=state(t, now).value, age=round(t.age(now), 3),
                       fresh_until=t.fresh_until, stale_until=t.stale_until,
                       error_until=t.error_until, etag=entry.etag)
        else:
            row.update(state="gone")
        rows.append(row)
    return rows


def _source_and_params(st: AppState, name: str) -> tuple[Any, dict[str, str]]:
    source = st.extra.get("sources", {}).get(name)
    if source is None:
        raise NotFound(f"no source named {name!r}")
    return source, request.args.to_dict(flat=True)


@bp.delete("/api/sources/<name>")
def invalidate(name: str) -> Response:
    st = state_of()
    source, params = _source_and_params(st, name)
    key = None
    try:
        if params:
            key = job_for(st, source, source.check(params)).key
            st.region.invalidate(key)
            scope = "entry"
        else:
            bump_generation(st, name)
            scope = "source"
    except CacheUnavailable as exc:
        raise Unavailable(f"memcached is needed to invalidate: {exc}") from exc
    event(log, logging.INFO, "admin", "invalidated", action="invalidate", source=name,
          scope=scope, key=key)
    return jsonify({"invalidated": scope, "source": name, "params": params})


@bp.post("/api/sources/<name>/refresh")
def refresh(name: str) -> tuple[Response, int]:
    st = state_of()
    source, params = _source_and_params(st, name)
    if source.kind == "composite":
        raise BadRequest("refresh the parts of a composite source one by one")
    job = job_for(st, source, source.check(params))
    scheduled = st.region.refresh_later(job)
    event(log, logging.INFO, "admin", "refresh requested", action="refresh", source=name,
          key=job.key, scheduled=scheduled)
    return jsonify({"scheduled": scheduled, "source": name, "params": params}), 202


@bp.get("/")
def page() -> Response:
    st = state_of()
    token: str = st.extra["admin_token"]
    sources = st.extra.get("sources", {})
    rows = "".join(
        f"<tr><td>{html.escape(s.name)}</td><td>{s.kind}</td>"
        f"<td>{html.escape(', '.join(s.required + s.optional))}</td>"
        f"<td>{s.settings.max_age:g}/{s.settings.stale_while_revalidate:g}/"
        f"{s.settings.stale_if_error:g}</td>"
        f"<td><button data-src='{html.escape(s.name)}' class=inv>invalidate all</button></td>"
        f"</tr>" for s in sources.values())
    body = _PAGE.replace("{{ROWS}}", rows).replace("{{CSRF}}", csrf_token(token))
    return Response(body, mimetype="text/html", headers={
        "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                   "style-src 'unsafe-inline'; connect-src 'self'",
        "X-Frame-Options": "DENY", "Cache-Control": "no-store",
    })


_PAGE = """<!doctype html>
<html><head><meta charset=utf-8><title>swr-cache admin</title>
<meta name=csrf content="{{CSRF}}">
<style>body{font:14px system-ui;margin:2em}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f4f4f4}
.fresh{color:#080}.stale{color:#b60}.error_only,.gone{color:#b00}</style></head>
<body><h1>swr-cache admin</h1>
<h2>Sources</h2><table><tr><th>name</th><th>kind</th><th>params</th>
<th>max-age / swr / sie</th><th></th></tr>{{ROWS}}</table>
<h2>Stats</h2><pre id=stats>loading…</pre>
<h2>Entries (this worker)</h2><table id=entries><tr><th>source</th><th>params</th>
<th>state</th><th>age</th><th>last refresh</th><th>lease</th><th></th></tr></table>
<script>
const csrf = document.querySelector('meta[name=csrf]').content;
const send = (method, url) => fetch(url, {method, headers: {'X-CSRF-Token': csrf}})
  .then(r => r.json()).then(load);
const qs = p => new URLSearchParams(p || {}).toString();
function cell(tr, text, cls) { const td = tr.insertCell(); td.textContent = text;
  if (cls) td.className = cls; return td; }
function load() {
  fetch('api/stats').then(r => r.json()).then(s => {
    document.getElementById('stats').textContent = JSON.stringify(s, null, 2); });
  fetch('api/entries').then(r => r.json()).then(rows => {
    const t = document.getElementById('entries');
    while (t.rows.length > 1) t.deleteRow(1);
    for (const e of rows) {
      const tr = t.insertRow();
      cell(tr, e.source); cell(tr, JSON.stringify(e.params)); cell(tr, e.state, e.state);
      cell(tr, e.age ?? ''); cell(tr, e.last_refresh ?? ''); cell(tr, e.lease_holder ? 'held' : '');
      const td = tr.insertCell();
      if (e.params) {
        const src = encodeURIComponent(e.source), q = qs(e.params);
        const inv = document.createElement('button'); inv.textContent = 'invalidate';
        inv.onclick = () => send('DELETE', `api/sources/${src}?${q}`);
        const ref = document.createElement('button'); ref.textContent = 'refresh';
        ref.onclick = () => send('POST', `api/sources/${src}/refresh?${q}`);
        td.append(inv, ref);
      }
    }
  });
}
for (const b of document.querySelectorAll('button.inv'))
  b.onclick = () => send('DELETE', `api/sources/${encodeURIComponent(b.dataset.src)}`);
load();
</script></body></html>
"""


def init_app(app: Flask) -> None:
    """Enable the admin routes when SERVICE_ADMIN_TOKEN is set (environment only)."""
    state_of(app).extra["admin_token"] = os.environ.get("SERVICE_ADMIN_TOKEN") or None
