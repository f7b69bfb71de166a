"""The application factory: load settings, let each module wire itself in, register the
blueprints (here and nowhere else)."""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Flask

from . import errors
from .admin import routes as admin
from .config import Settings, load_settings
from .flask.extension import SWR
from .http import health, views
from .observe import logs, metrics

swr = SWR()
"""The service's own :class:`~service.extension.SWR`; its state lives in each app."""
cache = swr.cache
"""The service's Flask-Caching object (``service.backend.MemcachedCache``, namespace
``<prefix>.fc``), for the service's own code and python sources."""


def create_app(settings: Settings | None = None, *, clock: Callable[[], float] = time.time,
               monotonic: Callable[[], float] | None = None) -> Flask:
    """Build the service's app.

    Nothing here connects, spawns or schedules: memcached connections are made on first
    use in the worker, and the refresher is started by gunicorn's ``post_worker_init``.

    :param settings: already loaded settings; by default :func:`load_settings` reads the
        file named by ``SERVICE_SETTINGS`` (or the repository's ``settings.toml``).
    :param clock: the wall clock of every freshness decision, and ``monotonic`` the
        clock of ``l1_ttl``, leases and back-off (by default ``clock`` when that is
        given, else ``time.monotonic``): tests pass one fake clock for both.
    :raises ConfigError: the settings file is unusable.
    """
    settings = settings or load_settings()
    # The ground floor is configured from above; it never reaches up for the settings.
    logs.configure(settings.server.log_format)
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    monotonic = monotonic or (clock if clock is not time.time else time.monotonic)
    swr.init_app(app, settings, clock=clock, monotonic=monotonic)
    errors.init_app(app)
    views.init_app(app)
    admin.init_app(app)
    for bp in (health.bp, metrics.bp, views.bp, admin.bp):
        app.register_blueprint(bp)
    return app
