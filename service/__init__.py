"""Stale-while-revalidate caching for Flask apps under gunicorn + gevent, over memcached.

The names below are imported when first used, not with the package: gunicorn imports
``service.accesslog`` in its master (``logger_class``), which must not import Flask or
the app's modules before gevent patches the workers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import cache as cache
    from .app import create_app as create_app
    from .config import Settings as Settings
    from .config import load_settings as load_settings
    from .flask.dropin import Cache as Cache
    from .flask.extension import SWR as SWR
    from .readpath.freshness import Windows as Windows

__all__ = ["SWR", "Cache", "Settings", "Windows", "cache", "create_app", "load_settings"]

_HOMES = {"cache": ".app", "create_app": ".app", "Settings": ".config",
          "load_settings": ".config", "Cache": ".flask.dropin", "SWR": ".flask.extension",
          "Windows": ".readpath.freshness"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'service' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
