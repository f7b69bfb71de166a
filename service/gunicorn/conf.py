"""The gunicorn config of any app that uses swr-cache: import it, extend it.

Use it as it is::

    gunicorn -c python:service.gunicorn.conf --bind 0.0.0.0:8000 app:app

or start your own ``gunicorn.conf.py`` with it and add or override settings below::

    from service.gunicorn.conf import *  # noqa: F403  (the hooks and the worker settings)

    bind = "0.0.0.0:8000"
    workers = 4

    def on_exit(server):                  # a hook of your own: call ours too
        my_cleanup()
        swr_on_exit(server)

It gives every worker what the cache needs and the host a whole view of itself:

* gevent workers, the app imported after fork (never in the master), the access logger;
* the hooks: ``post_worker_init`` (the refresher, the hub monitor, the batched accept),
  ``worker_exit`` (refreshes drain, leases released), ``post_request`` (a keep-alive
  connection waits its turn), ``on_starting``/``on_reload`` (the settings file checked in
  the master, so a broken one never takes the host down);
* Prometheus' multiprocess mode: the master points ``PROMETHEUS_MULTIPROC_DIR`` at a
  directory of its own (``swr-cache-metrics-<pid>`` in the temp directory, emptied at
  start) before it forks the workers,
  each worker keeps its counters there, ``/metrics`` and the admin's tiles merge them, so
  they show the whole host and not the worker that answered; ``child_exit`` marks a dead
  worker's gauges gone, and ``on_exit`` removes the directory (one that was given in the
  environment is the caller's: it is emptied at start, never removed).

Every hook is also exported as ``swr_<hook>`` so a config that defines its own can still
call ours. This module is evaluated by gunicorn's master, which must not import Flask,
gevent's patched modules or the app: the hooks import the worker's side inside.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import tempfile
from typing import Any

__all__ = [
    "worker_class", "workers", "worker_connections", "preload_app", "timeout", "keepalive",
    "logger_class", "access_log_format", "control_socket_disable",
    "on_starting", "on_reload", "on_exit", "child_exit",
    "post_worker_init", "worker_exit", "post_request",
    "swr_on_starting", "swr_on_reload", "swr_on_exit", "swr_child_exit",
    "swr_post_worker_init", "swr_worker_exit", "swr_post_request",
]

# -- workers -------------------------------------------------------------------------------
# gevent: each worker is one event loop on one core, serving many requests at once by
# switching greenlets on I/O. More workers than cores only adds memory and memcached
# connections; fewer leaves cores idle. One per core.
worker_class = "gevent"
workers = multiprocessing.cpu_count()
# Concurrent requests (greenlets) per worker. Requests mostly wait on memcached or are
# answered from the in-process tier, so 1000 is cheap; they share the worker's
# pool_size memcached connections (a request holds one only while it talks to memcached).
# Past this number gunicorn stops accepting, which is the back-pressure we want. Keep it
# above the keep-alive connections one worker is handed: a busy keep-alive connection
# never frees its slot, so the ones past the limit wait unaccepted.
worker_connections = 1000
# The app is imported in each worker after fork, never in the master: the memcached pool,
# the refresher greenlets and the process pool belong to a worker. With preload_app the
# master would import the app, and anything started there would not survive the fork.
preload_app = False
# For gevent workers this is the heartbeat: a worker whose hub is blocked this long is
# killed and replaced (the hub monitor reports much shorter blocks).
timeout = 30
keepalive = 5

# -- logs ------------------------------------------------------------------------------------
# Access lines are gunicorn's, written in batches from memory (never a locked write per
# request from the request's greenlet) and made from the atoms the format uses only
# (service/gunicorn/accesslog.py, which imports nothing but logging and gunicorn).
logger_class = "service.accesslog.BufferedAccessLogger"
# One line per request with how the cache answered (X-Cache) and the request time in
# seconds, so "why was this slow?" is answered by grep: a MISS waited for the origin.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s x_cache=%({x-cache}o)s time=%(L)s ua="%(a)s"'
# gunicorn >= 25 opens a control socket in $XDG_RUNTIME_DIR or ~/.gunicorn; two instances
# of one user would share (and delete) it. Nothing here uses gunicornc.
control_socket_disable = True

# -- metrics: Prometheus multiprocess mode ----------------------------------------------------
# Each worker writes its counters to files in one directory and /metrics merges them. The
# variable must be in the environment before any worker imports prometheus_client: the
# master sets it in on_starting, before it forks the first worker (with preload_app, which
# this config turns off, the app would be imported earlier, in the master). Nothing is set
# when this module is imported: importing it elsewhere changes nothing.
_own_metrics_dir: str | None = None


def on_starting(server: Any) -> None:
    """Master, once: an empty metrics directory in the environment the workers inherit
    (counts from a previous run would be merged into ours), and the settings as they are
    now as the last good ones."""
    global _own_metrics_dir
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir:
        # Per master: a HUP keeps the master, its pid and this directory.
        metrics_dir = os.path.join(tempfile.gettempdir(), f"swr-cache-metrics-{os.getpid()}")
        _own_metrics_dir = metrics_dir
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.makedirs(metrics_dir, exist_ok=True)
    for path in glob.glob(os.path.join(metrics_dir, "*.db")):
        os.remove(path)
    from service.gunicorn.reload import check_settings

    check_settings(server.log)


def on_reload(server: Any) -> None:
    """Master, on HUP: a broken settings file is logged once (file and key) and the new
    workers keep the last good settings (service/gunicorn/reload.py)."""
    from service.gunicorn.reload import check_settings

    check_settings(server.log)


def on_exit(server: Any) -> None:
    """Master, last: nothing of this run is left in the temp directory."""
    from service.gunicorn.reload import forget

    forget()
    if _own_metrics_dir is not None:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)


def child_exit(server: Any, worker: Any) -> None:
    """Master, when a worker exits: its live gauges ("livesum") stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


# -- per-worker start and stop ----------------------------------------------------------------
# post_worker_init runs in the worker after gevent patched it and the app was loaded: the
# right moment to start per-worker greenlets (post_fork runs before the patch).
# worker_exit runs in the worker as it exits: running refreshes finish and release their
# leases, then the process pool stops. Imported inside: the master must not import the
# app's modules (urllib3 imports ssl before gevent patches the worker).
def post_worker_init(worker: Any) -> None:
    from service.gunicorn.worker import post_worker_init as start

    start(worker)


def worker_exit(server: Any, worker: Any) -> None:
    from service.gunicorn.worker import worker_exit as drain

    drain(server, worker)
    from service.memcache.chunks import stop_joiners

    stop_joiners()  # the large-value join threads, made on first use
    flush = getattr(worker.log, "flush_access", None)
    if flush is not None:
        flush()  # the access lines still buffered


# A keep-alive connection whose next request is already waiting is served again and again
# by its greenlet without the hub ever running (a cache hit never blocks), and the worker's
# other connections wait: p99 of seconds under load. A connection that answers several
# times in a row before the loop has run again (BACK_TO_BACK) waits for the loop's next
# turn, so every ready connection is served a few times per turn, and a connection that
# had to wait for its request pays nothing (service.gunicorn.worker.post_request says more).
def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    global _yield_to_others
    if _yield_to_others is None:
        # Imported on the worker's first answer, then kept: an import statement here ran
        # on every answer and cost more than the hook's own work (0.85 against 0.5 µs).
        from service.gunicorn.worker import post_request as imported

        _yield_to_others = imported
    _yield_to_others(worker, req, environ, resp)


_yield_to_others: Any = None


swr_on_starting = on_starting
swr_on_reload = on_reload
swr_on_exit = on_exit
swr_child_exit = child_exit
swr_post_worker_init = post_worker_init
swr_worker_exit = worker_exit
swr_post_request = post_request
