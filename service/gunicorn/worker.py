"""What each gunicorn worker does when it starts serving and when it exits.

These are the hooks a gunicorn config needs; ``deploy/gunicorn.conf.py`` uses them, and so
can a library user's own config::

    # gunicorn.conf.py
    worker_class = "gevent"

    def post_worker_init(worker):
        from service.worker import post_worker_init
        post_worker_init(worker)

    def worker_exit(server, worker):
        from service.worker import worker_exit
        worker_exit(server, worker)

    def post_request(worker, req, environ, resp):
        from service.worker import post_request
        post_request(worker, req, environ, resp)

(imported inside the hooks: the config file is evaluated in the master, which should not
import the app's modules before gevent patches the workers).

``post_worker_init`` runs in the worker after gevent has patched it and the app is
loaded (``post_fork`` runs too early, before the patch): it starts the refresher (and
the periodic jobs) and the hub monitor, freezes the objects loaded so far (see
:func:`freeze_startup_objects`), and lets the worker accept new connections in batches,
the least busy worker first (see :mod:`service.acceptor`). ``worker_exit`` runs in the
worker as it shuts down: ``/readyz`` answers 503 from then on, running refreshes finish
(and release their leases), its slot on the accept board is freed, and the niced child
processes go. ``post_request`` runs in the worker after each
response and lets the worker's other connections have their turn (see
:func:`post_request`). Nothing here runs in the master.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Callable
from typing import Any

import gevent
import gevent.monkey
from flask import Flask
from gevent.hub import Waiter

from ..flask.state import EXTENSION, AppState
from ..observe import logs, metrics, monitor
from . import acceptor

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
    state: AppState | None = app.extensions.get(EXTENSION)
    if state is None:
        return
    state.refresher.start()
    monitor.start(state.settings.server.monitor_threshold)
    if not logging.getLogger().handlers:
        # A library app under these hooks, without a logging config of its own: our lines
        # take the run's one format, as gunicorn's and the access log's do (the service
        # configured its logger already; an app that configured logging keeps its own).
        logs.configure(state.settings.server.log_format)


def stopping(app: Flask, timeout: float = 10.0) -> None:
    """Drain this worker's refresher; ``/readyz`` answers 503 from now on."""
    state: AppState | None = app.extensions.get(EXTENSION)
    if state is None:
        return
    state.shutting_down = True
    killed = state.refresher.stop(timeout)
    if killed:
        log.warning("worker exit: %s refreshes did not finish in %.0fs", killed, timeout)
    fetchers = state.extra.get("fetchers")
    if fetchers is not None:
        fetchers.close()  # the niced child processes go with their worker
    metrics.stop_flusher()  # this worker's last buffered counts, before it goes


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: start the refresher in this worker, after fork and gevent's patch;
    and make ``/readyz`` answer 503 from the moment the worker is told to stop."""
    acceptor.accept_in_batches(worker)
    app = find_app(getattr(worker, "wsgi", None))
    if app is not None:
        started(app)
        state: AppState | None = app.extensions.get(EXTENSION)
        if state is not None:
            for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
                signal.signal(sig, readiness_off(state, signal.getsignal(sig)))
            # gunicorn does this for its own handler; installing ours resets it.
            signal.siginterrupt(signal.SIGTERM, False)
        freeze_startup_objects()


def freeze_startup_objects() -> None:
    """Take what the worker loaded (Flask, the app, gevent, every module) out of the
    garbage collector's sight: it lives as long as the worker anyway. Each full
    collection then scans only what requests made since, instead of pausing every
    request of the worker for 20-25 ms (measured under load with the bench app)."""
    gc.collect()
    gc.freeze()


def readiness_off(state: AppState, previous: Any) -> Callable[[int, Any], None]:
    """A signal handler that marks the worker as shutting down, then runs ``previous``
    (gunicorn's own: stop accepting, finish in-flight requests). Requests still in flight
    on keep-alive connections, and load balancers polling, see 503 from ``/readyz``."""

    def handler(signum: int, frame: Any) -> None:
        state.shutting_down = True
        if callable(previous):
            previous(signum, frame)

    return handler


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: drain this worker's refresher as it exits."""
    acceptor.release(worker)
    app = find_app(getattr(worker, "wsgi", None))
    if app is not None:
        graceful = float(getattr(getattr(server, "cfg", None), "graceful_timeout", 20) or 20)
        stopping(app, timeout=min(10.0, graceful / 2))


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """gunicorn hook: after each response on a keep-alive connection, let everything else
    that is ready in the worker run before this connection's next request is read.

    Why: gunicorn's gevent worker serves a keep-alive connection in one greenlet that
    loops read request, answer, read the next. A gevent socket only gives the hub a turn
    when a call would block, and a cache hit never blocks: when the client has sent its
    next request by the time the answer is out (a load balancer, a busy keep-alive client,
    wrk), that greenlet reads it at once and goes on, and every other connection of the
    worker waits, for seconds under load (p99 0.9-2.8 s at 32 connections, measured).

    The greenlet waits for the end of the loop's next iteration (:func:`next_turn`): the
    loop polls, every connection whose request is ready is served, then this one goes on.
    Two other ways were measured and rejected. ``gevent.sleep(0)`` resumes the greenlet
    before the loop polls again, so connections waiting on the poll still fall behind.
    Waiting for an idle loop (``gevent.idle``) gave the best tail with 1,000 keep-alive
    connections, but never returns while new connections keep arriving: keep-alive
    clients then got one request per second (the wait's bound) instead of thousands.
    A connection about to close, a request that failed before it had a response, or a
    worker without gevent (sync) has no one to yield to.
    """
    if not gevent.monkey.is_module_patched("socket") or resp is None or resp.should_close():
        return
    next_turn()


def next_turn() -> None:
    """Return once the loop has polled again and run everything that was ready, or at once
    if nothing else is ready: a check watcher of the lowest priority fires after every
    other event of the next iteration, and an idle watcher when there are none (it also
    keeps the loop from blocking in its poll meanwhile)."""
    hub = gevent.get_hub()
    waiter: Waiter[Any] = Waiter(hub)
    check = hub.loop.check()
    check.priority = -2   # libev's lowest (EV_MINPRI): after the iteration's I/O and timers
    idle = hub.loop.idle()
    check.start(waiter.switch, None)
    idle.start(waiter.switch, None)
    try:
        waiter.get()
    finally:
        # Both stopped before either can fire again: the other one, if due in the same
        # iteration, is cleared and never switches to this greenlet later.
        check.stop()
        idle.stop()
        check.close()
        idle.close()
