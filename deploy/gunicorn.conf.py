"""gunicorn settings for the service: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

``make run`` uses this file; so does the systemd unit. Anything here can be overridden
on the command line or with ``GUNICORN_CMD_ARGS`` (e.g. ``--bind=127.0.0.1:9000
--workers=2``); ``SERVICE_BIND`` and ``SERVICE_WORKERS`` are shorthands.
"""

import glob
import logging
import multiprocessing
import os
import tempfile
import threading
import time
import traceback

from gunicorn.glogging import Logger

# -- workers -------------------------------------------------------------------------------
bind = os.environ.get("SERVICE_BIND", "127.0.0.1:8000")
# gevent: each worker is one event loop on one core, serving many requests at once by
# switching greenlets on I/O. More workers than cores only adds memory and memcached
# connections; fewer leaves cores idle. One per core.
worker_class = "gevent"
workers = int(os.environ.get("SERVICE_WORKERS", multiprocessing.cpu_count()))
# Concurrent requests (greenlets) per worker. Requests mostly wait on memcached or are
# answered from the in-process tier, so 1000 is cheap; they share the worker's
# [cache] pool_size memcached connections (a request holds one only while it talks to
# memcached). Past this number gunicorn stops accepting, which is the back-pressure we want.
# Keep it above the keep-alive connections one worker is handed: a busy keep-alive
# connection never frees its slot, so the ones past the limit wait unaccepted.
worker_connections = 1000
# reuse_port stays off: the workers share one listening socket. post_worker_init makes each
# take every connection waiting when its loop comes round (gunicorn's gevent worker takes
# one per turn when there are several workers) and leave new connections to a clearly less
# busy worker first (service/acceptor.py: a board of open connections per worker, in
# /dev/shm/swr-accept-<master pid>). With reuse_port the kernel splits connections by
# count, also to a busy worker, and resets those queued at a worker that exits (a reload).
# The app is imported in each worker after fork, never in the master: the memcached pool,
# the refresher greenlets and the process pool belong to a worker. With preload_app the
# master would import the app, and anything started there would not survive the fork.
preload_app = False

# -- shutdown ------------------------------------------------------------------------------
# SIGTERM: a worker stops accepting, lets in-flight requests finish for graceful_timeout
# seconds, drains its refresher (worker_exit below), then exits. systemd's TimeoutStopSec
# must be a little longer. SIGHUP: new workers with re-read settings, old ones drain.
graceful_timeout = 30
# For gevent workers this is the heartbeat: a worker whose hub is blocked this long is
# killed and replaced (the hub monitor reports much shorter blocks, see monitor_threshold).
timeout = 30
keepalive = 5

# -- logs ------------------------------------------------------------------------------------
accesslog = "-"
errorlog = "-"
# One line per request with how the cache answered (X-Cache) and the request time in
# seconds, so "why was this slow?" is answered by grep: a MISS waited for the origin.
access_log_format = (
    '%(h)s "%(r)s" %(s)s %(b)s x_cache=%({x-cache}o)s time=%(L)s ua="%(a)s"'
)


class BufferedStreamHandler(logging.StreamHandler):
    """Access lines collected in memory and written in one ``write`` per batch.

    gunicorn writes each access line with its own locked, flushed ``write`` from the
    request's greenlet: at thousands of requests a second that is a system call per
    request, and a full pipe stops the whole worker. Lines wait here instead, and go out
    every ``interval`` seconds (a greenlet of the worker, started on the first line, never
    in the master) or as soon as ``limit`` bytes are waiting; ``flush()`` (worker exit,
    logging's shutdown) writes the rest. The line format is gunicorn's, unchanged.
    """

    interval = 0.25
    limit = 64 * 1024

    def __init__(self, stream):
        super().__init__(stream)
        self._lines = []
        self._size = 0
        self._pid = None

    def emit(self, record):
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.append(message)

    def append(self, message):
        """Queue one formatted line (``BufferedAccessLogger.access`` calls this directly)."""
        line = message + self.terminator
        self._lines.append(line)
        self._size += len(line)
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lines = [line]  # lines inherited from the master were its own to write
            self._size = len(line)
            # Patched by gevent in the worker: a greenlet; a daemon thread elsewhere.
            threading.Thread(target=self._drain, name="access-log", daemon=True).start()
        if self._size >= self.limit:
            self.flush()

    def _drain(self):
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.interval)
            self.flush()

    def flush(self):
        lines, self._lines, self._size = self._lines, [], 0
        if lines and self.stream is not None:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken stdout: the lines cannot go anywhere


def _status(atoms):
    status = atoms.resp.status
    return status.split(None, 1)[0] if isinstance(status, str) else status


def _sent(atoms):
    sent = getattr(atoms.resp, "sent", None)
    return "-" if sent is None else str(sent)


def _request_line(atoms):
    env = atoms.environ
    return f"{env['REQUEST_METHOD']} {env['RAW_URI']} {env['SERVER_PROTOCOL']}"


# gunicorn's access-log atoms (its docs' table), each a function of the request's atoms.
_ATOMS = {
    "h": lambda a: a.environ.get("REMOTE_ADDR", "-"),
    "l": lambda a: "-",
    "u": lambda a: a.log._get_user(a.environ) or "-",
    "t": lambda a: a.log.now(),
    "r": _request_line,
    "s": _status,
    "m": lambda a: a.environ.get("REQUEST_METHOD"),
    "U": lambda a: a.environ.get("PATH_INFO"),
    "q": lambda a: a.environ.get("QUERY_STRING"),
    "H": lambda a: a.environ.get("SERVER_PROTOCOL"),
    "b": _sent,
    "B": lambda a: getattr(a.resp, "sent", None),
    "f": lambda a: a.environ.get("HTTP_REFERER", "-"),
    "a": lambda a: a.environ.get("HTTP_USER_AGENT", "-"),
    "T": lambda a: a.request_time.seconds,
    "D": lambda a: a.request_time.seconds * 1_000_000 + a.request_time.microseconds,
    "M": lambda a: a.request_time.seconds * 1000 + a.request_time.microseconds // 1000,
    "L": lambda a: f"{a.request_time.seconds}.{a.request_time.microseconds:06d}",
    "p": lambda a: f"<{os.getpid()}>",
}


class AccessAtoms:
    """The atoms of one access line, each computed when the format asks for it.

    The values are gunicorn's (``Logger.atoms`` read through its ``SafeAtoms``): an
    unknown atom is ``-``, ``{name}i``/``{name}o``/``{name}e`` are a request header, a
    response header or an environ variable, case-insensitive, the last of a repeated
    name; a ``"`` in a text value is escaped. gunicorn builds every atom of every request
    first (each header and environ variable formatted into a dict, the date, ...) for the
    six the format uses. ``tests/unit/test_access_log.py`` compares the two line by line.
    """

    __slots__ = ("log", "resp", "req", "environ", "request_time")

    def __init__(self, log, resp, req, environ, request_time):
        self.log = log
        self.resp = resp
        self.req = req
        self.environ = environ
        self.request_time = request_time

    def __getitem__(self, key):
        if key.startswith("{"):
            value = self._named(key.lower())
        else:
            atom = _ATOMS.get(key)
            value = "-" if atom is None else atom(self)
        return value.replace('"', '\\"') if isinstance(value, str) else value

    def _named(self, key):
        kinds = {"}i": getattr(self.req, "headers", self.req), "}o": self.resp.headers,
                 "}e": self.environ}
        pairs = kinds.get(key[-2:])
        if pairs is None:
            return "-"
        if hasattr(pairs, "items"):
            pairs = pairs.items()
        wanted = key[1:-2]
        value = "-"
        for name, found in pairs:
            if name.lower() == wanted:
                value = found  # the last one wins, as in gunicorn's dict
        return value


class BufferedAccessLogger(Logger):
    """gunicorn's logger with the access log to stdout buffered (see above), and each
    access line made from the atoms its format uses only (:class:`AccessAtoms`).

    Measured with ``python -m bench.throughput``'s server, wrk at 32 connections: gunicorn's
    own ``access`` took about a quarter of a worker's time for a cached hit (every atom
    built, then the stdlib logging call); this one answers about 20% more requests a
    second, for every route. A logger set up otherwise (``logconfig``, syslog, a handler
    added by the app) gets gunicorn's path, unchanged.
    """

    def setup(self, cfg):
        super().setup(cfg)
        for i, handler in enumerate(self.access_log.handlers):
            if type(handler) is logging.StreamHandler and getattr(handler, "_gunicorn", False):
                buffered = BufferedStreamHandler(handler.stream)
                buffered.setFormatter(handler.formatter)
                buffered._gunicorn = True
                self.access_log.handlers[i] = buffered

    def access(self, resp, req, environ, request_time):
        log = self.access_log
        handlers = log.handlers
        # Straight to the buffer only when that is all logging would do with the line:
        # our one handler, gunicorn's "%(message)s" formatter, no filters, INFO enabled.
        if not (len(handlers) == 1 and type(handlers[0]) is BufferedStreamHandler
                and not handlers[0].filters and not log.filters
                and handlers[0].formatter is not None
                and handlers[0].formatter._fmt == "%(message)s"
                and log.isEnabledFor(logging.INFO) and handlers[0].level <= logging.INFO):
            super().access(resp, req, environ, request_time)
            return
        try:
            line = self.cfg.access_log_format % AccessAtoms(self, resp, req, environ,
                                                            request_time)
        except Exception:
            self.error(traceback.format_exc())
            return
        handlers[0].append(line)

    def flush_access(self):
        for handler in self.access_log.handlers:
            handler.flush()


logger_class = BufferedAccessLogger
# gunicorn >= 25 opens a control socket in $XDG_RUNTIME_DIR or ~/.gunicorn; two instances
# of one user would share (and delete) it, and systemd's ProtectHome forbids the home
# fallback. We do not use gunicornc.
control_socket_disable = True

# -- metrics: Prometheus multiprocess mode ----------------------------------------------------
# Each worker writes its counters to files in this directory and /metrics merges them. It
# must be set before any worker imports prometheus_client, hence here, in the master. The
# directory is per master (this file is evaluated by the master; its pid survives HUP).
METRICS_DIR = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), f"swr-cache-metrics-{os.getpid()}"),
)


def on_starting(server):
    # Counts from a previous run would be merged into ours: start from an empty directory.
    os.makedirs(METRICS_DIR, exist_ok=True)
    for path in glob.glob(os.path.join(METRICS_DIR, "*.db")):
        os.remove(path)


def child_exit(server, worker):
    # Runs in the master when a worker exits: its gauges ("livesum") stop counting.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


# -- per-worker start and stop ----------------------------------------------------------------
# post_worker_init runs in the worker after gevent patched it and the app was loaded: the
# right moment to start per-worker greenlets and threads (post_fork runs before the
# patch). worker_exit runs in the worker as it exits: running refreshes finish and release
# their leases, then the process pool stops. A library user's own gunicorn config imports
# the same hooks, and post_request below (see the README). They are imported inside the
# functions: this file is evaluated in the master, which must not import the app's
# modules (urllib3 imports ssl before gevent patches the worker).
def post_worker_init(worker):
    from service.worker import post_worker_init as start

    start(worker)


def worker_exit(server, worker):
    from service.worker import worker_exit as drain

    drain(server, worker)
    flush = getattr(worker.log, "flush_access", None)
    if flush is not None:
        flush()  # the access lines still buffered


# -- fairness between keep-alive connections ------------------------------------------------
# A keep-alive connection whose next request is already waiting is served again and again
# by its greenlet without the hub ever running (a cache hit never blocks), and the worker's
# other connections wait: p99 of seconds under load. After each response the connection
# waits for the loop's next turn, so every ready connection is served once per turn
# (service.worker.post_request says more, and why neither sleep(0) nor an idle wait).
def post_request(worker, req, environ, resp):
    from service.worker import post_request as yield_to_others

    yield_to_others(worker, req, environ, resp)
