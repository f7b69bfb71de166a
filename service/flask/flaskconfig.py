"""Settings from a Flask config, the Flask-Caching way; and a library app's settings.

Flask-Caching's keys mean what they mean there: ``CACHE_MEMCACHED_SERVERS``,
``CACHE_KEY_PREFIX``, ``CACHE_DEFAULT_TIMEOUT``, ``CACHE_OPTIONS`` (the pool and timeout
keys of ``[cache]``), plus ``CACHE_STALE_WHILE_REVALIDATE`` and ``CACHE_STALE_IF_ERROR``.
They are turned into the same document a ``settings.toml`` would be and validated by
:func:`service.config.parse_settings`, so a bad value is reported the same way, named as
the user wrote it. Like :mod:`service.config`, nothing else of the service is imported.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..config import (
    _PREFIX_RE,
    FLASK_CONFIG,
    Settings,
    _parse_cache,
    _read_toml,
    _Reader,
    parse_settings,
)


def library_settings(app_config: Mapping[str, Any]) -> Settings:
    """Defaults, then ``app_config`` (:func:`settings_from_flask`), then the file named by
    ``SERVICE_SETTINGS`` if set: an operator's override, key by key.

    :raises ConfigError: a bad Flask value (named as in Flask) or a bad file.
    """
    data = _flask_document(app_config, FLASK_CONFIG)
    env = os.environ.get("SERVICE_SETTINGS")
    if not env:
        return parse_settings(data, FLASK_CONFIG)
    document = _read_toml(Path(env))
    for name, table in document.items():
        if isinstance(table, Mapping) and isinstance(data.get(name), Mapping):
            data[name] = {**data[name], **table}
        else:
            data[name] = table
    return parse_settings(data, env)


def settings_from_flask(config: Mapping[str, Any], path: str = FLASK_CONFIG) -> Settings:
    """Settings from Flask-Caching's keys over the defaults; other keys are ignored.

    ``CACHE_MEMCACHED_SERVERS`` is a list of ``"host:port"`` (no port: 11211) or one
    string of them separated by commas or semicolons (as Flask-Caching splits it);
    ``CACHE_KEY_PREFIX`` any string (see :func:`namespace_for`);
    ``CACHE_DEFAULT_TIMEOUT`` whole seconds or a ``timedelta``, 0 = forever;
    ``CACHE_STALE_WHILE_REVALIDATE`` and ``CACHE_STALE_IF_ERROR`` seconds >= 0;
    ``CACHE_OPTIONS`` a dict of the ``[cache]`` keys in ``POOL_OPTIONS``, ``lock_lease``
    (seconds a recompute's claim lives unless renewed) and the ``BaseCache`` arguments
    Flask-Caching passes through it (``default_timeout``, ``ignore_delete_many_errors``).

    :raises ConfigError: a wrong type or value, or an unknown ``CACHE_OPTIONS`` name; the
        message names the Flask key, e.g. ``[CACHE_OPTIONS.pool_size]``.
    """
    return parse_settings(_flask_document(config, path), path)


def namespace_for(prefix: str) -> str:
    """A legal key namespace for any ``CACHE_KEY_PREFIX``.

    1-32 letters, digits, ``.``, ``-`` or ``_`` are kept as they are. Any other prefix
    (``"myapp:"``, ``""``, long, non-ASCII) becomes its legal characters (at most 16), ``-``
    and 10 hex digits of its SHA-256: deterministic, so every worker and host agrees.
    """
    if _PREFIX_RE.match(prefix):
        return prefix
    readable = re.sub(r"[^A-Za-z0-9_.-]", "", prefix)[:16]
    digest = hashlib.sha256(prefix.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{readable}-{digest}"


POOL_OPTIONS = ("pool_size", "connect_timeout", "timeout", "pool_timeout", "item_size_max",
                "circuit_failures", "circuit_reset", "l1_max_entries", "l1_max_bytes", "l1_ttl")
_BASECACHE_OPTIONS = ("default_timeout", "ignore_delete_many_errors")
# [refresh] keys a Flask-Caching app may set through CACHE_OPTIONS: how long a claim lives
# unless its holder (a recomputing request, renewed meanwhile) renews it.
_REFRESH_OPTIONS = ("lock_lease",)
_FLASK_KEYS = {"servers": "CACHE_MEMCACHED_SERVERS", "key_prefix": "CACHE_KEY_PREFIX",
               "default_timeout": "CACHE_DEFAULT_TIMEOUT",
               "stale_while_revalidate": "CACHE_STALE_WHILE_REVALIDATE",
               "stale_if_error": "CACHE_STALE_IF_ERROR"}


def _flask_name(key: str) -> str:
    leaf = key.removeprefix("cache.").removeprefix("refresh.")
    return _FLASK_KEYS.get(leaf) or f"CACHE_OPTIONS.{leaf}"


def _flask_document(config: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Flask-Caching's keys as a validated ``{"cache": {...}}`` settings document."""
    r = _Reader(path, rename=_flask_name)
    table: dict[str, Any] = {}
    servers = config.get("CACHE_MEMCACHED_SERVERS")
    if isinstance(servers, str):
        # Flask-Caching's string forms: "a:1,b:2" and "a:1;b:2" (its memcached backends
        # split on either); any whitespace around the names is dropped.
        servers = [s.strip() for s in re.split(r"[,;]", servers) if s.strip()]
    if isinstance(servers, list | tuple):  # "host" alone means memcached's port
        table["servers"] = [f"{s}:11211" if isinstance(s, str) and ":" not in s else s
                            for s in servers]
    elif servers is not None:
        r.fail("cache.servers",
               "a list of 'host:port', or one string of them separated by , or ;", servers)
    prefix = config.get("CACHE_KEY_PREFIX")
    if prefix is not None:
        if not isinstance(prefix, str):
            r.fail("cache.key_prefix", "a string", prefix)
        table["key_prefix"] = namespace_for(prefix)
    for name in ("default_timeout", "stale_while_revalidate", "stale_if_error"):
        if config.get(_FLASK_KEYS[name]) is not None:
            table[name] = config[_FLASK_KEYS[name]]
    options = config.get("CACHE_OPTIONS") or {}
    if not isinstance(options, Mapping):
        _Reader(path).fail("CACHE_OPTIONS", "a dict of options", options)
    allowed = POOL_OPTIONS + _BASECACHE_OPTIONS + _REFRESH_OPTIONS
    refresh: dict[str, Any] = {}
    for name, value in options.items():
        if name not in allowed:
            near = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            _Reader(path).fail(f"CACHE_OPTIONS.{name}",
                               f"a known option ({hint}allowed: {', '.join(allowed)})",
                               name)
        if name in _REFRESH_OPTIONS:
            refresh[name] = value
        elif name != "ignore_delete_many_errors":
            table[name] = value
    for name, value in table.items():
        if isinstance(value, timedelta):
            # Flask-Caching rounds a timedelta timeout up to whole seconds.
            seconds = value.total_seconds()
            table[name] = math.ceil(seconds) if name == "default_timeout" else seconds
    _parse_cache(r, table)  # fail here, naming the Flask key, not later with a TOML name
    return {"cache": table, "refresh": refresh} if refresh else {"cache": table}
