"""``CACHE_TYPE = "service.backend.MemcachedCache"``: the path Flask-Caching apps name.

The backend lives in :mod:`service.flask.backend`; this module keeps the documented path.
"""

from .flask.backend import MemcachedCache as MemcachedCache

__all__ = ["MemcachedCache"]
