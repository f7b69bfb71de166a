"""The service's liveness and readiness probes: :mod:`service.flask.health`, which any app
mounts with ``SWR(app, endpoints=True)`` (or ``SWR_ENDPOINTS = True`` in its config)."""

from ..flask.health import bp as bp
from ..flask.health import healthz as healthz
from ..flask.health import readyz as readyz

__all__ = ["bp", "healthz", "readyz"]
