"""gunicorn settings for the service: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

GUNICORN_CMD_ARGS (e.g. ``--bind=127.0.0.1:9000 --workers=2``) overrides what is here.
"""

import multiprocessing
import os

bind = os.environ.get("SERVICE_BIND", "127.0.0.1:8000")
worker_class = "gevent"
workers = int(os.environ.get("SERVICE_WORKERS", min(4, multiprocessing.cpu_count() * 2)))
worker_connections = 1000
# Each worker must build its own memcached pool and refresher after fork: with
# preload_app the app (and anything it started) would live in the master.
preload_app = False
graceful_timeout = 30
timeout = 30


def post_worker_init(worker):
    # After gevent patched this worker and the app was loaded: the right moment to start
    # per-worker greenlets (post_fork runs before the patch).
    from service.worker import find_app, started

    app = find_app(worker.wsgi)
    if app is not None:
        started(app)


def worker_exit(server, worker):
    from service.worker import find_app, stopping

    app = find_app(getattr(worker, "wsgi", None))
    if app is not None:
        stopping(app, timeout=min(10.0, graceful_timeout / 2))
