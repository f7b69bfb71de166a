"""Structured logs: one JSON object per line for every event that matters.

Events carry ``event`` (``refresh``, ``lease_lost``, ``memcached_error``, ``hub_blocked``,
``admin``...), the ``source``, and the cache key only as a short hash (``key``): keys can
hold user input, and values never appear in logs at all.

``[server] log_format = "text"`` writes the same fields as ``name=value`` pairs after the
message, for a terminal (:class:`TextFormatter`). The default, ``"auto"``, is text when
both stdout and stderr are terminals and JSON otherwise (a pipe, a file, journald); the
environment variable ``SWR_LOG_FORMAT`` (``auto``, ``json`` or ``text``) overrides the
setting (:func:`chosen_format`). One format per run: under the shipped gunicorn config,
gunicorn's own error log and the access log get the same formatter
(:func:`use_for_gunicorn`, called by :mod:`service.gunicorn.accesslog`).

Configuration happens in :func:`configure` for the ``service`` logger only, and only if
the host application has not configured it: a library should not take over the root
logger. Every message says by itself what happened, where (the server, the source, the
key's hash) and why, so a line still reads well where only the message is printed (an app
without a logging config: Python's last-resort handler prints the message alone).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson


def digest(key: str | bytes) -> str:
    """URL-safe SHA-256 of a key: 43 characters, stable across processes and hosts (what a
    log line and the admin name a key by: keys can hold what the logs must not)."""
    raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode("ascii")


# Set in a request's WSGI environ by the app when its access line is noise (the admin
# page's own timed reloads): the access log leaves such requests out.
QUIET = "swr.access_log.quiet"

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

    def format_line(self, logger: str, message: str) -> str:
        """An INFO line of ``logger`` saying ``message``, now (no record is made)."""
        writers: dict[str, Callable[[str], str]] = self.__dict__.setdefault("_writers", {})
        write = writers.get(logger)
        if write is None:
            write = writers[logger] = self.line_writer(logger)
        return write(message)

    def line_writer(self, logger: str) -> Callable[[str], str]:
        """What :meth:`format_line` does for ``logger``, as a function of the message
        (the access log keeps one: a call per line)."""
        raise NotImplementedError

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ts": _stamp(record.created, int(record.msecs)),
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


def _stamp(created: float, msecs: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{msecs:03d}Z"


# The access log writes a line per request: its timestamp is made once a millisecond
# (strftime once a second), and the rest of what comes before its message (level, logger,
# pid) once per logger and process (``line_writer``): strftime, getpid and a dict for
# orjson cost more than the rest of the line. A forked child learns its own pid at once.
_second: list[Any] = [-1, ""]
_milli: list[Any] = [-1, ""]
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def _now() -> str:
    milli = int(time.time() * 1000)
    if milli != _milli[0]:
        second = milli // 1000
        if second != _second[0]:
            _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
        _milli[:] = [milli, f"{_second[1]}.{milli % 1000:03d}Z"]
    text: str = _milli[1]
    return text


def _json_middle(logger: str, pid: int) -> str:
    # orjson's own output for the dict between the timestamp and the message: compact,
    # keys in this order (the timestamp needs no escaping).
    whole = orjson.dumps({"ts": "", "level": "info", "logger": logger, "pid": pid,
                          "msg": ""}).decode()
    return whole[len('{"ts":"'):-len('""}')]


class JSONFormatter(_FieldsFormatter):
    """``{"ts", "level", "logger", "pid", "msg", ...extra fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(self.fields(record), default=str).decode()

    def line_writer(self, logger: str) -> Callable[[str], str]:
        made = [-1, ""]   # the pid, and what comes between the timestamp and the message
        dumps = orjson.dumps

        def write(message: str) -> str:
            if made[0] != _pid[0]:
                made[:] = [_pid[0], _json_middle(logger, _pid[0])]
            # The same bytes as orjson.dumps of the whole dict: a string alone is escaped
            # as orjson escapes it inside the dict.
            return f'{{"ts":"{_now()}{made[1]}{dumps(message).decode()}}}'

        return write


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

    def line_writer(self, logger: str) -> Callable[[str], str]:
        made = [-1, ""]   # the pid, and what comes between the timestamp and the message

        def write(message: str) -> str:
            if made[0] != _pid[0]:
                made[:] = [_pid[0], f" INFO {logger} [{_pid[0]}] "]
            return f"{_now()}{made[1]}{_one_line(message)}"

        return write


_QUOTE_AND_BACKSLASH = '"\\'
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one_line(text: str, special: str = "") -> str:
    """``text`` with ``special`` characters and anything not printable backslash-escaped."""
    if text.isprintable() and not (special and any(ch in text for ch in special)):
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


FORMAT_ENV = "SWR_LOG_FORMAT"
FORMATS = ("auto", "json", "text")


def chosen_format(setting: str = "auto", streams: tuple[Any, ...] | None = None) -> str:
    """``"json"`` or ``"text"``: ``SWR_LOG_FORMAT`` when set, else ``setting``; ``"auto"``
    is text when every stream (stdout and stderr) is a terminal, JSON otherwise. Every
    process of a run (gunicorn's master, its workers) decides the same way, from the
    same environment and the same inherited streams. An unknown value of the variable is
    said on stderr and taken as ``auto``."""
    wanted = os.environ.get(FORMAT_ENV, "").strip().lower() or setting
    if wanted not in FORMATS:
        sys.stderr.write(f"{FORMAT_ENV}={wanted!r} is not one of {', '.join(FORMATS)}; "
                         "using auto (text on a terminal, JSON otherwise)\n")
        wanted = "auto"
    if wanted != "auto":
        return wanted
    for stream in streams if streams is not None else (sys.stdout, sys.stderr):
        try:
            if stream is None or not stream.isatty():
                return "json"
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            return "json"
    return "text"


def formatter(log_format: str = "auto") -> logging.Formatter:
    """The formatter of :func:`chosen_format` for ``log_format``."""
    return TextFormatter() if chosen_format(log_format) == "text" else JSONFormatter()


def configure(log_format: str = "auto") -> None:
    """Give the ``service`` logger a stderr handler, unless somebody configured it."""
    logger = logging.getLogger("service")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def use_for_gunicorn(loggers: Iterable[logging.Logger], log_format: str = "auto") -> None:
    """Give gunicorn's own handlers (the error log's and the access log's, those gunicorn
    marks ``_gunicorn``) the run's formatter, so that its lines, the access lines and ours
    share one format. Handlers from ``logconfig``/``logconfig_dict`` or syslog are left
    as configured."""
    chosen = formatter(log_format)
    for logger in loggers:
        for handler in logger.handlers:
            if getattr(handler, "_gunicorn", False) and not isinstance(
                    handler.formatter, _FieldsFormatter):
                handler.setFormatter(chosen)


def is_ours(fmt: logging.Formatter | None) -> bool:
    """``fmt`` is one of this module's formatters (it has :func:`line`'s fast path)."""
    return isinstance(fmt, _FieldsFormatter)


def _as_is(message: str) -> str:
    return message


def line_writer(fmt: logging.Formatter | None, logger: str) -> Callable[[str], str]:
    """:func:`line` for ``fmt`` and ``logger``, as a function of the message."""
    if isinstance(fmt, _FieldsFormatter):
        return fmt.line_writer(logger)
    return _as_is


def line(fmt: logging.Formatter | None, logger: str, message: str) -> str:
    """``message`` as an INFO line of ``logger`` in ``fmt``'s format, the fast way (the
    access log's lines: no record, no extra fields); as it is for any other formatter."""
    if isinstance(fmt, _FieldsFormatter):
        return fmt.format_line(logger, message)
    return message



