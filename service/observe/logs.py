"""Structured logs: one JSON object per line for every event that matters.

Events carry ``event`` (``refresh``, ``lease_lost``, ``memcached_error``, ``hub_blocked``,
``admin``...), the ``source``, and the cache key only as a short hash (``key``): keys can
hold user input, and values never appear in logs at all.

``[server] log_format = "text"`` writes the same fields as ``name=value`` pairs after the
message, for a terminal (:class:`TextFormatter`). Configuration happens
in :func:`init_app` for the ``service`` logger only, and only if the host application has
not configured it: a library should not take over the root logger.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import sys
import time
from typing import Any

import orjson


def digest(key: str | bytes) -> str:
    """URL-safe SHA-256 of a key: 43 characters, stable across processes and hosts (what a
    log line and the admin name a key by: keys can hold what the logs must not)."""
    raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode("ascii")


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


class _FieldsFormatter(logging.Formatter):
    """The fields of a record, shared by both formats so that neither can drop one.

    ``ts``, ``level``, ``logger``, ``pid`` and ``msg``, then every extra field the call
    passed (in their order), then ``exc`` (the formatted exception) and ``stack_info`` when
    the record has them.
    """

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
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
        elif record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return data


class JSONFormatter(_FieldsFormatter):
    """``{"ts", "level", "logger", "pid", "msg", ...extra fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(self.fields(record), default=str).decode()


class TextFormatter(_FieldsFormatter):
    """The same fields as :class:`JSONFormatter`, for a terminal, on one line::

        2026-01-01T12:00:00.000Z INFO service.swr [4242] fetched event=refresh source=primes
        key=kgv_360O0EFI0f_F outcome=ok seconds=1.6654 leased=true

    The message comes first as written (only newlines and other control characters
    escaped); every other field follows as ``name=value`` (logfmt).
    A value with a space, a quote, ``=``, a backslash or a control character, or an empty
    one, is double-quoted with backslash escapes (``\\n`` for a newline), so a traceback
    or a stack stays on its line. ``True``/``False``/``None`` read ``true``/``false``/
    ``null``, and lists and dicts are written as JSON, as in the JSON format.
    """

    def format(self, record: logging.LogRecord) -> str:
        data = self.fields(record)
        head = (f"{data.pop('ts')} {data.pop('level').upper()} {data.pop('logger')} "
                f"[{data.pop('pid')}] {_one_line(str(data.pop('msg')))}")
        pairs = (f"{_field_name(name)}={_text_value(value)}" for name, value in data.items())
        return " ".join([head, *pairs])


_QUOTE_AND_BACKSLASH = '"\\'
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one_line(text: str, special: str = "") -> str:
    """``text`` with ``special`` characters and anything not printable backslash-escaped."""
    if text.isprintable() and not any(ch in text for ch in special):
        return text
    out = []
    for ch in text:
        if ch in special or not ch.isprintable():
            code = ord(ch)
            out.append(_ESCAPES.get(ch)
                       or (f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"))
        else:
            out.append(ch)
    return "".join(out)


def _field_name(name: str) -> str:
    return "".join(ch if ch.isprintable() and ch not in " =" + _QUOTE_AND_BACKSLASH else "_"
                   for ch in name) or "_"


def _text_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | dict):
        text = orjson.dumps(value, default=str).decode()
    else:
        text = str(value)
    if text and text.isprintable() and not any(ch in text for ch in " =" + _QUOTE_AND_BACKSLASH):
        return text
    return '"' + _one_line(text, special=_QUOTE_AND_BACKSLASH) + '"'


def configure(log_format: str) -> None:
    """Give the ``service`` logger a stderr handler, unless somebody configured it."""
    logger = logging.getLogger("service")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)



