"""What each gunicorn worker does when it starts serving and when it exits.

Called from ``deploy/gunicorn.conf.py``: ``post_worker_init`` runs in the worker after
gevent has patched it and the app is loaded (``post_fork`` runs too early, before the
patch), and ``worker_exit`` runs in the worker as it shuts down. Nothing here runs in
the master.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from . import monitor
from .health import SHUTTING_DOWN
from .swr import EXTENSION, SWRCache

log = logging.getLogger(__name__)


def find_app(wsgi: Any) -> Flask | None:
    """The Flask app behind gunicorn's ``worker.wsgi`` (possibly wrapped by middleware)."""
    seen = 0
    while wsgi is not None and seen < 10:
        if isinstance(wsgi, Flask):
            return wsgi
        wsgi = getattr(wsgi, "app", None) or getattr(wsgi, "wsgi_app", None)
        seen += 1
    return None


def started(app: Flask) -> None:
    """Start this worker's refresher (and its periodic functions) and hub monitor."""
    cache: SWRCache | None = app.extensions.get(EXTENSION)
    if cache is not None:
        cache.refresher.start()
    settings = app.extensions.get("service.settings")
    if settings is not None:
        monitor.start(settings.server.monitor_threshold)


def stopping(app: Flask, timeout: float = 10.0) -> None:
    """Drain this worker's refresher; ``/readyz`` answers 503 from now on."""
    app.extensions[SHUTTING_DOWN] = True
    cache: SWRCache | None = app.extensions.get(EXTENSION)
    if cache is not None:
        killed = cache.refresher.stop(timeout)
        if killed:
            log.warning("worker exit: %s refreshes did not finish in %.0fs", killed, timeout)
    fetchers = app.extensions.get("service.fetchers")
    if fetchers is not None:
        fetchers.close()  # the niced child processes go with their worker
