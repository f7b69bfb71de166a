"""``logger_class = "service.accesslog.BufferedAccessLogger"`` in a gunicorn config.

The logger lives in :mod:`service.gunicorn.accesslog`. gunicorn imports this in its
master: it imports no Flask (nor anything gevent must patch first).
"""

from .gunicorn.accesslog import BufferedAccessLogger as BufferedAccessLogger

__all__ = ["BufferedAccessLogger"]
