"""A user's own tiny app, as the docs tell them to write it: no ``create_app``, no
``settings.toml``; served by ``gunicorn -c python:service.gunicorn.conf tests.user_app:app``.

Its config comes from the environment the test gives it (``USER_APP_MEMCACHED``,
``USER_APP_PREFIX``). Every answer says which worker gave it (``X-Worker``, added around
the whole app, so also on the answers the fast path gives before Flask's dispatch).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, jsonify

from service import SWR, admin

app = Flask(__name__)
app.config["CACHE_MEMCACHED_SERVERS"] = os.environ["USER_APP_MEMCACHED"]
app.config["CACHE_KEY_PREFIX"] = os.environ["USER_APP_PREFIX"]
app.config["SWR_ENDPOINTS"] = True              # /healthz, /readyz, /metrics
swr = SWR(app)
app.register_blueprint(admin.bp)                # /admin/, with SERVICE_ADMIN_TOKEN


@app.get("/report")
@swr.cached(max_age=60)
def report() -> Any:
    return jsonify(answer=42)


def _tag_worker(wsgi: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def tagged(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            return start_response(status, [*headers, ("X-Worker", str(os.getpid()))], *exc)

        return wsgi(environ, start)

    return tagged


app.wsgi_app = _tag_worker(app.wsgi_app)  # type: ignore[method-assign]
