"""The application factory: load settings, then let each module wire itself in."""

from __future__ import annotations

from flask import Flask

from . import admin, errors, health, logs, metrics, views
from .config import Settings, load_settings
from .extension import SETTINGS, SWR

swr = SWR()
"""The service's own :class:`~service.extension.SWR` (pool, both tiers, refresher)."""
cache = swr.cache
"""The Flask-Caching object, backed by memcached through :mod:`service.backend`."""


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app.

    Nothing here connects, spawns or schedules: memcached connections are made on first
    use in the worker, and the refresher is started by gunicorn's ``post_worker_init``.

    :param settings: already loaded settings; by default :func:`load_settings` reads the
        file named by ``SERVICE_SETTINGS`` (or ``settings.toml``).
    :raises ConfigError: the settings file is unusable.
    """
    settings = settings or load_settings()
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[SETTINGS] = settings
    logs.init_app(app)
    errors.init_app(app)
    swr.init_app(app, settings)
    health.init_app(app)
    metrics.init_app(app)
    views.init_app(app)
    admin.init_app(app)
    return app

