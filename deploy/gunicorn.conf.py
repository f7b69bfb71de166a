"""gunicorn settings for the service: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

``make run`` uses this file; so does the systemd unit. Anything here can be overridden
on the command line or with ``GUNICORN_CMD_ARGS`` (e.g. ``--bind=127.0.0.1:9000
--workers=2``); ``SERVICE_BIND`` and ``SERVICE_WORKERS`` are shorthands.

Everything an app using swr-cache needs under gunicorn (gevent workers, the hooks, the
access logger, Prometheus' multiprocess directory and its clean-up) comes from
``service/gunicorn/conf.py``, the config a library user imports too; what follows is
this deployment's own.
"""

import os

from service.gunicorn.conf import *  # noqa: F403  (the shared settings and hooks)

# -- workers -------------------------------------------------------------------------------
bind = os.environ.get("SERVICE_BIND", "127.0.0.1:8000")
if os.environ.get("SERVICE_WORKERS"):
    workers = int(os.environ["SERVICE_WORKERS"])
# reuse_port stays off: the workers share one listening socket. post_worker_init makes each
# take every connection waiting when its loop comes round (gunicorn's gevent worker takes
# one per turn when there are several workers) and leave new connections to a clearly less
# busy worker first (service/gunicorn/acceptor.py: a board of open connections per worker,
# in /dev/shm/swr-accept-<master pid>). With reuse_port the kernel splits connections by
# count, also to a busy worker, and resets those queued at a worker that exits (a reload).
reuse_port = False

# -- shutdown ------------------------------------------------------------------------------
# SIGTERM: a worker stops accepting, lets in-flight requests finish for graceful_timeout
# seconds, drains its refresher (worker_exit), then exits. systemd's TimeoutStopSec
# must be a little longer. SIGHUP: new workers with re-read settings, old ones drain.
graceful_timeout = 30

# -- logs ------------------------------------------------------------------------------------
accesslog = "-"
errorlog = "-"
