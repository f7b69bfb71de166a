"""The admin API and page: see and steer what the fleet caches.

Mounted by :func:`service.create_app`; a library app mounts it with
``app.register_blueprint(service.admin.bp)`` after ``SWR().init_app(app)``. Enabled only
when ``SERVICE_ADMIN_TOKEN`` is set in the environment; otherwise every ``/admin`` route
answers 404 with how to turn it on (nothing can be done through a disabled admin, so
saying that it exists gives nothing away).

Authentication, all compared in constant time:

* ``Authorization: Bearer <token>`` (scripts);
* HTTP Basic with the token as the password (a browser's login dialog, or a URL
  ``http://user:TOKEN@host/admin/``);
* the session cookie the page sets after either of those: ``swr_admin``, an expiry and
  an HMAC of it under the token (rotating the token ends every session), ``HttpOnly``,
  ``SameSite=Strict``, limited to the admin's path. The page's own requests use it:
  Chromium refuses ``fetch()`` to a URL that carries credentials, and a page opened as
  ``http://user:TOKEN@host/admin/`` would otherwise hand them to every relative URL.

Cross-site requests: a browser sends Basic credentials and cookies by itself, so a page
elsewhere could make it send ``DELETE`` here. Mutating requests authenticated by Basic or
by the cookie must therefore carry ``X-CSRF-Token`` (an HMAC of the token, embedded in
our page; a cross-site form cannot set a header without a CORS preflight we never grant),
and any request whose ``Origin`` is not this host is refused. Every mutating request is
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

from ..errors import BadRequest, HTTPError, NotFound
from ..flask.state import EXTENSION, AppState, state_of
from ..observe.logs import event
from . import actions
from . import entries as adminentries
from . import stats as adminstats
from .install import install

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


def csrf_token(token: str) -> str:
    return _sign(token, "swr-cache admin csrf")


def session_cookie(token: str, now: float) -> str:
    expiry = int(now) + SESSION_SECONDS
    return f"{expiry}.{_sign(token, f'session:{expiry}')}"


def _valid_session(value: str, token: str, now: float) -> bool:
    expiry, _, mac = value.partition(".")
    # A cookie is the client's: at most 12 ASCII digits (a Unix time) before it is a number
    # at all. int() of thousands of digits raises, and a 500 before authentication would
    # be the answer to anyone who sends one.
    if not (expiry.isascii() and expiry.isdigit()) or len(expiry) > 12 or int(expiry) < now:
        return False
    return hmac.compare_digest(mac.encode(), _sign(token, f"session:{expiry}").encode())


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
    if cookie is not None and _valid_session(cookie, token, time.time()):
        return "cookie"
    return None


@bp.before_request
def authenticate() -> Response | None:
    token = admin_token(state_of())
    if not token:
        # Still a 404: with no token nothing here can be used, so there is nothing to
        # protect by hiding it, and the operator who opens the page learns the fix.
        raise NotFound("the admin is off: set SERVICE_ADMIN_TOKEN in the server's "
                       "environment and restart it (any user name, the token as the "
                       "password; see docs/ADMIN.md)")
    scheme = _scheme(token)
    if scheme is None:
        return _error(401, "unauthorized", "admin token required",
                      {"WWW-Authenticate": 'Basic realm="swr-cache admin"'})
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/") != request.host_url.rstrip("/"):
        return _error(403, "forbidden", f"cross-origin request from {origin}")
    if request.method not in SAFE_METHODS and scheme != "bearer":
        sent = request.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(sent.encode(), csrf_token(token).encode()):
            return _error(403, "forbidden", "X-CSRF-Token missing or wrong")
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


def _configured(st: AppState) -> dict[str, Any]:
    return actions.configured(st)


# -- one entry, by id (the page's per-row buttons) -----------------------------------------

@bp.delete("/api/entries/<entry_id>")
def invalidate_entry(entry_id: str) -> Response:
    st = state_of()
    rec = actions.record(st, entry_id)
    actions.invalidate(st, [rec], _who())
    _audit("invalidated", action="invalidate", scope="entry", source=rec["s"], key=rec["k"])
    return jsonify({"invalidated": "entry", "id": entry_id, "source": rec["s"],
                    "params": rec.get("p")})


@bp.post("/api/entries/<entry_id>/refresh")
def refresh_entry(entry_id: str) -> tuple[Response, int]:
    st = state_of()
    rec = actions.record(st, entry_id)
    result = actions.refresh_entry(st, rec)
    _audit("refresh requested", action="refresh", source=rec["s"], key=rec["k"], **result)
    return jsonify({**result, "source": rec["s"], "params": rec.get("p")}), 202


# -- a source: a /v1 source, or a decorated view or function ---------------------------------

@bp.delete("/api/sources/<name>")
def invalidate_source(name: str) -> Response:
    """One entry (with params), or every entry of the source (without)."""
    params = request.args.to_dict(flat=True)
    done = actions.invalidate_source(state_of(), name, params, _who())
    _audit("invalidated", action="invalidate", scope=done["scope"], source=name,
           key=done["key"], entries=done["entries"])
    return jsonify({"invalidated": done["scope"], "source": name, "params": params,
                    "entries": done["entries"]})


@bp.post("/api/sources/<name>/refresh")
def refresh_source_entry(name: str) -> tuple[Response, int]:
    params = request.args.to_dict(flat=True)
    result = actions.refresh_source(state_of(), name, params)
    key = result.pop("key")
    _audit("refresh requested", action="refresh", source=name, key=key, **result)
    return jsonify({**result, "source": name, "params": params}), 202


# -- the page ------------------------------------------------------------------------------------

@bp.get("/")
def page() -> Response:
    st = state_of()
    token = admin_token(st) or ""
    nonce = secrets.token_urlsafe(16)
    body = render_template("swr_admin/index.html", csrf=csrf_token(token), nonce=nonce,
                           script=adminstats.asset("admin.js"),
                           style=adminstats.asset("admin.css"))
    response = Response(body, mimetype="text/html", headers={
        "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; "
                                   f"style-src 'nonce-{nonce}'; connect-src 'self'; "
                                   "img-src 'self' data:; frame-ancestors 'none'",
        "X-Frame-Options": "DENY", "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
    })
    response.set_cookie(COOKIE, session_cookie(token, time.time()), max_age=SESSION_SECONDS,
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
