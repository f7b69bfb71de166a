"""The gunicorn hooks at their documented path (``from service.worker import ...``).

They live in :mod:`service.gunicorn.worker`.
"""

from .gunicorn.worker import post_request as post_request
from .gunicorn.worker import post_worker_init as post_worker_init
from .gunicorn.worker import worker_exit as worker_exit

__all__ = ["post_request", "post_worker_init", "worker_exit"]
