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

import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.monkey
from flask import Flask

from ..flask.state import EXTENSION, AppState
from ..observe import logs, metrics, monitor
from . import acceptor, onesend

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
    monitor.stop()          # its watchdog thread, started in started()


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: start the refresher in this worker, after fork and gevent's patch;
    make ``/readyz`` answer 503 from the moment the worker is told to stop; and have
    gunicorn send each response's head with its first body bytes
    (:mod:`service.gunicorn.onesend`)."""
    acceptor.accept_in_batches(worker)
    onesend.install()
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
    """gunicorn hook: after a response on a keep-alive connection, make sure the worker's
    event loop has run since this connection's previous answer, so that everything else
    ready in the worker is served before this connection's next request is read.

    Why: gunicorn's gevent worker serves a keep-alive connection in one greenlet that
    loops read request, answer, read the next. A gevent socket only gives the hub a turn
    when a call would block, and a cache hit never blocks: when the client has sent its
    next request by the time the answer is out (a load balancer, a busy keep-alive client,
    wrk), that greenlet reads it at once and goes on, and every other connection of the
    worker waits, for seconds under load (p99 0.9-2.8 s at 32 connections, measured).

    The bound: :data:`BACK_TO_BACK` answers in a row per connection before it waits. The
    loop counts its iterations (``loop.iteration``); each connection remembers the
    iteration of its last answer and how many it gave back to back. An answer in a later
    iteration means the connection waited for its request and the loop polled meanwhile
    (every other ready connection had its turn): the run starts again, nothing to pay,
    and that is most answers on a server that is not saturated. An answer in the same
    iteration as the previous one means the request was already waiting and the hub
    never ran; after ``BACK_TO_BACK`` of those (fewer when many connections are ready
    behind it, :func:`allowed_run`), or once the run has lasted :data:`RUN_SECONDS`
    (slow answers), the connection waits for the loop's next turn (:func:`next_turn`).
    Under saturation every connection's next request is always waiting, so the bound is
    what decides the cost: a turn costs far more inside a loaded worker than alone (its
    switches and the other connections' work evict what the caches held), and a turn
    after every back-to-back answer cost 8.5 to 14% of the worker's CPU per request;
    after 8, 2.5 to 10%, with a p99 at 32 connections of 21 to 28 ms against 6.5 to 7.8
    ms (after every one) and 120 to 380 ms (no turn at all). Measured with ``python -m
    bench.ab`` (``bench/findings.md``). A connection about to close, a request that
    failed before it had a response, or a worker without gevent (sync) has no one to
    yield to.
    """
    if resp is None or not gevent.monkey.is_module_patched("socket") or resp.should_close():
        return
    loop = gevent.get_hub().loop
    # gunicorn's parser (and its unreader) lives as long as the connection: the iteration
    # of the connection's last answer is kept there, not in a table that would outlive it.
    unreader = getattr(req, "unreader", None)
    if unreader is None:
        next_turn()
        return
    iteration = loop.iteration
    now = clock()
    last, run, began = getattr(unreader, _LAST_ANSWER, _NONE_YET)
    if last != iteration:
        run, began = 0, now   # it waited for this request: a new run starts here
    else:
        run += 1
    # The run's bound, in answers and in time: cheap answers go on up to BACK_TO_BACK,
    # fewer the more connections are ready behind this one (they all wait for the run),
    # and an answer slower than RUN_SECONDS gives the others their turn after itself.
    if run and (run >= allowed_run(others_ready(loop)) or now - began >= RUN_SECONDS):
        next_turn()
        iteration, run, began = loop.iteration, 0, clock()
    setattr(unreader, _LAST_ANSWER, (iteration, run, began))


#: Answers a connection may give back to back (in one iteration of the loop, its next
#: request already waiting each time) before it waits for the loop's next turn. Measured
#: under saturation (``python -m bench.ab``, wrk 32 connections, /raw, 9 interleaved rounds
#: of 3 s, worker CPU per request against no turn at all, and p99): 1: +8.5 to +9.7%,
#: 6.5 ms; 4: +9.1%, 14 ms; 8: +2.5 to +4.9%, 25 ms; 16: +4.0%, 36 ms; 32: +1.1%, 54 ms;
#: no turn: 120 to 160 ms. 8 is the smallest bound within 5%.
BACK_TO_BACK = 8
#: What a run may cost the connections ready behind it, in answers they wait for in all:
#: with up to 16 of them ready a run is BACK_TO_BACK answers; with 128 or more, one (the
#: turn after every back-to-back answer, whose p99 held at 1,000 connections while a run
#: of 8 took it from 0.7 to 3.2-3.6 s).
ANSWERS_AHEAD = 128


def allowed_run(ready: int) -> int:
    """Back-to-back answers a connection may give with ``ready`` others ready behind it."""
    return min(BACK_TO_BACK, max(1, ANSWERS_AHEAD // max(1, ready)))


def others_ready(loop: Any) -> int:
    """Connections ready behind the running one: the loop's events polled and not yet
    handled in this iteration (``pendingcnt``, libev's), and the greenlets waiting for,
    or being resumed by, the next turn (:class:`_Turns`)."""
    turns = _turns
    behind = turns.behind + len(turns.waiting) if turns is not None else 0
    return int(getattr(loop, "pendingcnt", 0)) + behind


#: And at most this long, wall clock, from the end of the answer that started the run:
#: answers that take 2 ms or more each (a slow view) give the others a turn after each,
#: so a busy connection never holds them for 8 slow answers. 8 cheap answers take about
#: 1 ms of CPU, more on a host whose CPU is shared; a bound of 1 ms cut their runs short
#: there (the same CPU as a turn after every answer).
RUN_SECONDS = 0.002
#: The clock of the runs (a module attribute: the tests drive it).
clock = time.perf_counter
#: The attribute of gunicorn's per-connection unreader holding the loop iteration of the
#: connection's last answer, how many it gave back to back, and when its run began
#: (:func:`post_request`).
_LAST_ANSWER = "_swr_last_answer"
_NONE_YET = (-1, 0, 0.0)


class _Turns:
    """The worker's waiting line for :func:`next_turn`: one check watcher of the lowest
    priority and one idle watcher, made once and started only while greenlets wait,
    instead of two new watchers and a ``Waiter`` for every turn."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.waiting: list[Any] = []
        self.behind = 0   # greenlets of the turn being resumed that have not run yet
        self.check = hub.loop.check()
        self.check.priority = -2   # libev's lowest (EV_MINPRI): after the iteration's I/O
        self.idle = hub.loop.idle()

    def wait(self) -> None:
        current = gevent.getcurrent()
        if not self.waiting:
            self.check.start(self._resume)
            self.idle.start(self._resume)
        self.waiting.append(current)
        try:
            self.hub.switch()
        except BaseException:
            # Killed while waiting (the hub threw into it): it must not be resumed later.
            with contextlib.suppress(ValueError):
                self.waiting.remove(current)
            raise

    def _resume(self) -> None:
        # Runs in the hub. Both watchers stop before anyone resumes: the other one, if due
        # in the same iteration, is cleared and resumes nobody twice. Each greenlet runs
        # until it blocks again (which comes back here, in the hub), then the next one.
        self.check.stop()
        self.idle.stop()
        waiting, self.waiting = self.waiting, []
        for i, glet in enumerate(waiting):
            self.behind = len(waiting) - i - 1
            try:
                glet.switch()
            except BaseException:
                self.hub.handle_error(glet, *sys.exc_info())
        self.behind = 0


_turns: _Turns | None = None


def next_turn() -> None:
    """Return once the loop has polled again and run everything that was ready, or at once
    if nothing else is ready: the check watcher fires after every other event of the next
    iteration, and the idle watcher when there are none (it also keeps the loop from
    blocking in its poll meanwhile).

    Two other ways were measured and rejected. ``gevent.sleep(0)`` resumes the greenlet
    before the loop polls again, so connections waiting on the poll still fall behind.
    Waiting for an idle loop (``gevent.idle``) gave the best tail with 1,000 keep-alive
    connections, but never returns while new connections keep arriving: keep-alive
    clients then got one request per second (the wait's bound) instead of thousands.
    """
    global _turns
    hub = gevent.get_hub()
    if _turns is None or _turns.hub is not hub:
        _turns = _Turns(hub)   # one line per worker (its hub); a new hub gets its own
    _turns.wait()
