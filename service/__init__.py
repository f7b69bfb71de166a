"""Stale-while-revalidate caching for Flask apps under gunicorn + gevent, over memcached."""

from .app import cache as cache
from .app import create_app as create_app
from .config import Settings as Settings
from .config import load_settings as load_settings
from .dropin import Cache as Cache
from .extension import SWR as SWR
from .freshness import Windows as Windows

__all__ = ["SWR", "Cache", "Settings", "Windows", "cache", "create_app", "load_settings"]
