"""The admin API and page: see and steer what the fleet caches.

Mounted by :func:`service.create_app`; a library app mounts it with
``app.register_blueprint(service.admin.bp)`` after ``SWR().init_app(app)``. Enabled only
when ``SERVICE_ADMIN_TOKEN`` is set in the environment; otherwise every ``/admin`` route
answers 404, as if it did not exist.

Authentication, all compared in constant time:

* ``Authorization: Bearer <token>`` (scripts);
* HTTP Basic with the token as the password (a browser's login dialog, or a URL
  ``http://user:TOKEN@host/admin/``);
* the session cookie the page sets after either of those: ``swr_admin``, an expiry, a
  random nonce and an HMAC of both under the token (rotating the token ends every
  session), ``HttpOnly``,
  ``SameSite=Strict``, limited to the admin's path. The page's own requests use it:
  Chromium refuses ``fetch()`` to a URL that carries credentials, and a page opened as
  ``http://user:TOKEN@host/admin/`` would otherwise hand them to every relative URL.

Cross-site requests: a browser sends Basic credentials and cookies by itself, so a page
elsewhere could make it send ``DELETE`` here. Mutating requests authenticated by Basic or
by the cookie must therefore carry the session cookie and its ``X-CSRF-Token`` (an HMAC
of that session under the token, embedded in our page; a cross-site form cannot set a
header without a CORS preflight we never grant), and any request whose ``Origin`` is not
this host is refused. The CSRF token rotates with the session: a page load without a
valid session starts a new one (new nonce, new token), and a session lasts
``SESSION_SECONDS``; a token of another session, or of an expired one, is refused. A
page load within a valid session keeps it, so two open tabs keep working. Every mutating request is
written to the log as an ``admin`` event: who (scheme, remote address), what, which key
(hashed).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, render_template, request, url_for
from flask.blueprints import BlueprintSetupState

from ..errors import BadRequest, CacheUnavailable, HTTPError, NotFound, Unavailable
from ..flask.state import EXTENSION, AppState, state_of
from ..observe.logs import event
from . import entries as adminentries
from . import stats as adminstats
from .install import install
from .registry import Record

log = logging.getLogger(__name__)
bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
COOKIE = "swr_admin"
SESSION_SECONDS = 12 * 3600


@bp.errorhandler(HTTPError)
def _http_error(exc: HTTPError) -> Response:
    # In a library app nothing else answers our errors as JSON (create_app's handlers are
    # the service's): the blueprint answers its own.
    return exc.to_response()


def _sign(token: str, purpose: str) -> str:
    return hmac.new(token.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def csrf_token(token: str, session: str) -> str:
    """The CSRF token of one session (the session cookie's whole value): it changes with
    every new session, and is worth nothing once that session has expired."""
    return _sign(token, f"swr-cache admin csrf:{session}")


def session_cookie(token: str, now: float) -> str:
    """A new session: ``expiry.nonce.mac``; the nonce makes two sessions started in the
    same second differ, and so their CSRF tokens."""
    expiry = int(now) + SESSION_SECONDS
    nonce = secrets.token_urlsafe(12)
    return f"{expiry}.{nonce}.{_sign(token, f'session:{expiry}:{nonce}')}"


def _valid_session(value: str, token: str, now: float) -> bool:
    expiry, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    # A cookie is the client's: at most 12 ASCII digits (a Unix time) before it is a number
    # at all. int() of thousands of digits raises, and a 500 before authentication would
    # be the answer to anyone who sends one.
    if not (expiry.isascii() and expiry.isdigit()) or len(expiry) > 12 or int(expiry) < now:
        return False
    if not nonce or len(nonce) > 32:
        return False
    return hmac.compare_digest(mac.encode(),
                               _sign(token, f"session:{expiry}:{nonce}").encode())


def _session_expiry(value: str) -> int:
    """The expiry of a session cookie :func:`_valid_session` accepted."""
    return int(value.partition(".")[0])


def admin_token(st: AppState) -> str | None:
    """The configured token: set by :func:`init_app`, else read from the environment (a
    library app that only registered the blueprint)."""
    if "admin_token" not in st.extra:
        st.extra["admin_token"] = os.environ.get("SERVICE_ADMIN_TOKEN") or None
    token: str | None = st.extra["admin_token"]
    return token


def _scheme(token: str) -> str | None:
    """How the request authenticated (``bearer``, ``basic``, ``cookie``), or ``None``."""
    auth = request.authorization
    if auth is not None and auth.type in ("bearer", "basic"):
        presented = (auth.token if auth.type == "bearer" else auth.password) or ""
        return auth.type if hmac.compare_digest(presented.encode(), token.encode()) else None
    cookie = request.cookies.get(COOKIE)
    if cookie is not None and _valid_session(cookie, token, _now()):
        return "cookie"
    return None


def _now() -> float:
    return time.time()      # the wall clock: a cookie's expiry is a Unix time


@bp.before_request
def authenticate() -> Response | None:
    token = admin_token(state_of())
    if not token:
        raise NotFound("no such route")
    scheme = _scheme(token)
    if scheme is None:
        return _error(401, "unauthorized", "admin token required",
                      {"WWW-Authenticate": 'Basic realm="swr-cache admin"'})
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/") != request.host_url.rstrip("/"):
        return _error(403, "forbidden", f"cross-origin request from {origin}")
    if request.method not in SAFE_METHODS and scheme != "bearer":
        # The token of the session this browser holds now: never one of an older session.
        session = request.cookies.get(COOKIE, "")
        if not _valid_session(session, token, _now()):
            return _error(403, "forbidden", "no admin session: load /admin/ (or send the "
                          "token as Authorization: Bearer)")
        sent = request.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(sent.encode(), csrf_token(token, session).encode()):
            return _error(403, "forbidden", "X-CSRF-Token missing, wrong or of another "
                          "session")
    request.environ["swr.admin.scheme"] = scheme
    return None


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None
           ) -> Response:
    response = jsonify({"error": error, "detail": detail})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _who() -> str:
    return f"{request.environ.get('swr.admin.scheme', '?')} from {request.remote_addr}"


def _audit(message: str, **fields: Any) -> None:
    event(log, logging.INFO, "admin", message, who=request.environ.get("swr.admin.scheme"),
          remote=request.remote_addr, **fields)


# -- reading -----------------------------------------------------------------------------------

@bp.get("/api/stats")
def stats() -> Response:
    return jsonify(adminstats.collect(state_of()))


@bp.get("/api/entries")
def entries() -> Response:
    try:
        filters = adminentries.Filters.parse(request.args.to_dict(flat=True))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return jsonify(adminentries.listing(state_of(), filters))


@bp.get("/api/sources")
def sources() -> Response:
    """The configured ``/v1`` sources and the decorated views and functions the registry
    lists, with how many entries each has."""
    st = state_of()
    recs, _scope = adminentries.records(st)
    counts: dict[str, dict[str, Any]] = {}
    for rec in recs:
        item = counts.setdefault(rec["s"], {"name": rec["s"], "kind": rec.get("kind", "-"),
                                            "entries": 0})
        item["entries"] += 1
    out = []
    for source in _configured(st).values():
        out.append({**source.describe(), "entries": counts.pop(source.name, {}).get(
            "entries", 0), "front_door": "/v1"})
    out.extend(sorted(counts.values(), key=lambda c: c["name"]))
    return jsonify(out)


def _job_for(st: AppState, source: Any, params: dict[str, str]) -> Any:
    """The job of a ``/v1`` source's entry, as the service's views build it (they set the
    hook; an app without them has no sources to refresh)."""
    if st.source_job is None:
        raise NotFound("this app serves no /v1 sources")
    return st.source_job(st, source, params)


def _configured(st: AppState) -> dict[str, Any]:
    found: dict[str, Any] = st.extra.get("sources", {})
    return found


# -- one entry, by id (the page's per-row buttons) -----------------------------------------

def _record(st: AppState, entry_id: str) -> Record:
    rec = adminentries.find(st, entry_id)
    if rec is None:
        raise NotFound(f"no entry with id {entry_id!r} is listed")
    return rec


@bp.delete("/api/entries/<entry_id>")
def invalidate_entry(entry_id: str) -> Response:
    st = state_of()
    rec = _record(st, entry_id)
    _invalidate(st, [rec])
    _audit("invalidated", action="invalidate", scope="entry", source=rec["s"], key=rec["k"])
    return jsonify({"invalidated": "entry", "id": entry_id, "source": rec["s"],
                    "params": rec.get("p")})


@bp.post("/api/entries/<entry_id>/refresh")
def refresh_entry(entry_id: str) -> tuple[Response, int]:
    st = state_of()
    rec = _record(st, entry_id)
    return _refresh(st, rec)


def _invalidate(st: AppState, recs: list[Record]) -> None:
    try:
        adminentries.invalidate(st, recs, _who())
    except CacheUnavailable as exc:
        raise Unavailable(f"memcached is needed to invalidate: {exc}") from exc


def _refresh(st: AppState, rec: Record) -> tuple[Response, int]:
    known = st.ledger.get(rec["k"])
    job = known.job if known is not None else None
    source = _configured(st).get(rec["s"])
    if job is None and rec.get("kind") == "source" and source is not None \
            and isinstance(rec.get("p"), dict):
        candidate = _job_for(st, source, rec["p"])
        job = candidate if candidate.key == rec["k"] else None
    try:
        result = adminentries.refresh(st, rec, job)
    except CacheUnavailable as exc:
        raise Unavailable(f"memcached is needed to refresh: {exc}") from exc
    _audit("refresh requested", action="refresh", source=rec["s"], key=rec["k"], **result)
    return jsonify({**result, "source": rec["s"], "params": rec.get("p")}), 202


# -- a source: a /v1 source, or a decorated view or function ---------------------------------

def _listed(st: AppState, name: str, params: dict[str, str] | None) -> list[Record]:
    recs = [r for r in adminentries.records(st)[0] if r["s"] == name]
    return [r for r in recs if params is None or (r.get("p") or {}) == params]


@bp.delete("/api/sources/<name>")
def invalidate_source(name: str) -> Response:
    """One entry (with params), or every entry of the source (without)."""
    st = state_of()
    params = request.args.to_dict(flat=True)
    source = _configured(st).get(name)
    try:
        if source is not None and params:
            job = _job_for(st, source, source.check(params))
            recs = [r for r in _listed(st, name, None) if r["k"] == job.key] or [
                {"k": job.key, "s": name, "kind": "source", "p": job.params}]
            _invalidate(st, recs)
            scope = "entry"
        else:
            recs = _listed(st, name, params or None)
            if source is None and not recs:
                raise NotFound(f"no source, view or function named {name!r} has entries")
            if source is not None:
                st.generations.bump(name)
            _invalidate(st, recs)
            scope = "source" if not params else "entry"
    except CacheUnavailable as exc:
        raise Unavailable(f"memcached is needed to invalidate: {exc}") from exc
    _audit("invalidated", action="invalidate", scope=scope, source=name,
           key=recs[0]["k"] if scope == "entry" else None, entries=len(recs))
    return jsonify({"invalidated": scope, "source": name, "params": params,
                    "entries": len(recs)})


@bp.post("/api/sources/<name>/refresh")
def refresh_source_entry(name: str) -> tuple[Response, int]:
    st = state_of()
    params = request.args.to_dict(flat=True)
    source = _configured(st).get(name)
    if source is not None:
        if source.kind == "composite":
            raise BadRequest("refresh the parts of a composite source one by one")
        job = _job_for(st, source, source.check(params))
        scheduled = st.region.refresh_later(job)
        _audit("refresh requested", action="refresh", source=name, key=job.key,
               scheduled=scheduled)
        return jsonify({"scheduled": scheduled, "source": name, "params": params}), 202
    recs = _listed(st, name, params)
    if len(recs) != 1:
        raise NotFound(f"{len(recs)} entries of {name!r} have exactly these parameters; "
                       "refresh one by its id (POST /admin/api/entries/ID/refresh)")
    return _refresh(st, recs[0])


# -- the page ------------------------------------------------------------------------------------

@bp.get("/")
def page() -> Response:
    st = state_of()
    token = admin_token(st) or ""
    now = _now()
    session = request.cookies.get(COOKIE, "")
    if not _valid_session(session, token, now):
        session = session_cookie(token, now)        # a new session: a new CSRF token
    nonce = secrets.token_urlsafe(16)
    body = render_template("swr_admin/index.html", csrf=csrf_token(token, session),
                           nonce=nonce,
                           script=adminstats.asset("admin.js"),
                           style=adminstats.asset("admin.css"))
    response = Response(body, mimetype="text/html", headers={
        "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; "
                                   f"style-src 'nonce-{nonce}'; connect-src 'self'; "
                                   "img-src 'self' data:; frame-ancestors 'none'",
        "X-Frame-Options": "DENY", "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
    })
    response.set_cookie(COOKIE, session, max_age=max(0, int(_session_expiry(session) - now)),
                        path=url_for("admin.page"), httponly=True, samesite="Strict",
                        secure=request.is_secure)
    return response


@bp.record_once
def _install_with_the_blueprint(setup: BlueprintSetupState) -> None:
    # The admin owns its observer and reporter: registering it installs them (when the
    # app's read path is set up already; otherwise init_app or the first request does).
    st = setup.app.extensions.get(EXTENSION)
    if st is not None:
        install(st)


def init_app(app: Flask) -> None:
    """Read ``SERVICE_ADMIN_TOKEN`` (environment only) for the app's admin routes, and
    install the admin's registry and reporter in the app's read path."""
    st = state_of(app)
    st.extra["admin_token"] = os.environ.get("SERVICE_ADMIN_TOKEN") or None
    install(st)
