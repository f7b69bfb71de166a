"""The application factory: load settings, then let each module wire itself in."""

from __future__ import annotations

import logging

from flask import Flask
from flask_caching import Cache

from . import clients, errors, health, metrics
from .config import Settings, load_settings

log = logging.getLogger(__name__)

SETTINGS = "service.settings"
cache = Cache()
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
    errors.init_app(app)
    clients.init_app(app, settings.cache)
    cache.init_app(app, config={
        "CACHE_TYPE": "service.backend.MemcachedCache",
        "CACHE_DEFAULT_TIMEOUT": 300,
    })
    health.init_app(app)
    metrics.init_app(app)
    return app


def get_settings(app: Flask) -> Settings:
    settings: Settings = app.extensions[SETTINGS]
    return settings
