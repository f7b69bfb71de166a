"""Structured logs: one JSON object per line for every event that matters.

Events carry ``event`` (``refresh``, ``lease_lost``, ``memcached_error``, ``hub_blocked``,
``admin``...), the ``source``, and the cache key only as a short hash (``key``): keys can
hold user input, and values never appear in logs at all.

``[server] log_format = "text"`` keeps plain lines for a terminal. Configuration happens
in :func:`init_app` for the ``service`` logger only, and only if the host application has
not configured it: a library should not take over the root logger.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson
from flask import Flask

from .keys import digest

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def key_hash(key: str) -> str:
    """What logs show of a cache key: 16 characters of its SHA-256."""
    return digest(key)[:16]


def event(logger: logging.Logger, level: int, name: str, message: str, **fields: Any) -> None:
    """Log ``message`` as event ``name`` with extra fields (``key`` is hashed here)."""
    if "key" in fields and fields["key"] is not None:
        fields["key"] = key_hash(str(fields["key"]))
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"event": name, **fields})


class JSONFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "pid", "msg", ...extra fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                data[name] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def configure(log_format: str) -> None:
    """Give the ``service`` logger a stderr handler, unless somebody configured it."""
    logger = logging.getLogger("service")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def init_app(app: Flask) -> None:
    from .state import state_of

    configure(state_of(app).settings.server.log_format)
