"""gunicorn settings for the service: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

GUNICORN_CMD_ARGS (e.g. ``--bind=127.0.0.1:9000 --workers=2``) overrides what is here.
"""

import multiprocessing
import os

bind = os.environ.get("SERVICE_BIND", "127.0.0.1:8000")
worker_class = "gevent"
workers = int(os.environ.get("SERVICE_WORKERS", min(4, multiprocessing.cpu_count() * 2)))
worker_connections = 1000
# Each worker must build its own memcached pool and refresher after fork.
preload_app = False
graceful_timeout = 30
timeout = 30
