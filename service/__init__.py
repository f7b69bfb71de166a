"""Stale-while-revalidate caching for Flask apps under gunicorn + gevent, over memcached."""

from .app import cache as cache
from .app import create_app as create_app
from .config import Settings as Settings
from .config import load_settings as load_settings

__all__ = ["Settings", "cache", "create_app", "load_settings"]
