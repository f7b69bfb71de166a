"""gunicorn settings for the service: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

``make run`` uses this file; so does the systemd unit. Anything here can be overridden
on the command line or with ``GUNICORN_CMD_ARGS`` (e.g. ``--bind=127.0.0.1:9000
--workers=2``); ``SERVICE_BIND`` and ``SERVICE_WORKERS`` are shorthands.
"""

import glob
import multiprocessing
import os
import shutil
import tempfile

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


# Access lines are gunicorn's, written in batches from memory (never a locked write per
# request from the request's greenlet) and made from the atoms the format uses only, not
# every header and environ variable of every request: about 20% more requests a second
# (service/accesslog.py, which imports nothing but logging and gunicorn in this master).
logger_class = "service.accesslog.BufferedAccessLogger"
# gunicorn >= 25 opens a control socket in $XDG_RUNTIME_DIR or ~/.gunicorn; two instances
# of one user would share (and delete) it, and systemd's ProtectHome forbids the home
# fallback. We do not use gunicornc.
control_socket_disable = True

# -- metrics: Prometheus multiprocess mode ----------------------------------------------------
# Each worker writes its counters to files in this directory and /metrics merges them. It
# must be set before any worker imports prometheus_client, hence here, in the master. The
# directory is per master (this file is evaluated by the master; its pid survives HUP).
# A directory of our own (none was given) is removed when the master exits (on_exit), so
# no run leaves one behind in the temp directory.
OWN_METRICS_DIR = os.path.join(tempfile.gettempdir(), f"swr-cache-metrics-{os.getpid()}")
METRICS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or OWN_METRICS_DIR
os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR


def on_starting(server):
    # Counts from a previous run would be merged into ours: start from an empty directory.
    os.makedirs(METRICS_DIR, exist_ok=True)
    for path in glob.glob(os.path.join(METRICS_DIR, "*.db")):
        os.remove(path)
    # The settings as they are now are the last good ones a reload can fall back on.
    from service.gunicorn.reload import check_settings

    check_settings(server.log)


# -- reloads (kill -HUP) never take the host down ----------------------------------------
# The master checks the settings file before the new workers start: a broken one is logged
# once (file and key) and the new workers keep the last good settings; a good one takes
# effect. service/gunicorn/reload.py says how. It imports no Flask: this is the master.
def on_reload(server):
    from service.gunicorn.reload import check_settings

    check_settings(server.log)


def on_exit(server):
    from service.gunicorn.reload import forget

    forget()
    if METRICS_DIR == OWN_METRICS_DIR:
        shutil.rmtree(METRICS_DIR, ignore_errors=True)


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
# other connections wait: p99 of seconds under load. A connection that answers a second
# time before the loop has run again waits for the loop's next turn, so every ready
# connection is served once or twice per turn, and a connection that had to wait for its
# request pays nothing (service.worker.post_request says more, and why neither sleep(0)
# nor an idle wait).
def post_request(worker, req, environ, resp):
    from service.worker import post_request as yield_to_others

    yield_to_others(worker, req, environ, resp)
