"""gunicorn's access log, buffered and made from the atoms its format uses.

``logger_class = "service.accesslog.BufferedAccessLogger"`` in a gunicorn config (the
shipped ``deploy/gunicorn.conf.py`` has it). The lines are gunicorn's, byte for byte
(``tests/unit/test_access_log.py`` compares them with gunicorn's own); what changes is
what they cost:

* gunicorn builds every atom for every request (each request header, response header and
  environ variable formatted into a dict, the date...) for the handful its format uses,
  then goes through stdlib logging; :class:`AccessAtoms` computes an atom when the format
  asks for it, and the line goes straight to the buffer. Measured with the hit bench's
  server (wrk, 32 connections, 4 rounds): about 20% more requests a second on every route;
* gunicorn writes each line with its own locked, flushed ``write`` from the request's
  greenlet; :class:`BufferedStreamHandler` (and :class:`BufferedFileHandler` for a log
  file) writes them in batches.

gunicorn loads this class in the master, before any worker forks. This module imports
only the standard library and gunicorn (``service/__init__`` imports nothing eagerly), so
the master never imports Flask, the app or anything that would import ``ssl`` before
gevent patches the workers; its one thread starts on a worker's first line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import IO, Any, cast

from gunicorn.glogging import Logger

from ..observe import logs

#: This process's pid, kept by a fork hook: ``os.getpid`` is a system call, and
#: :meth:`_Batches.append` looks at it for every line to tell a new worker.
_process = [os.getpid()]


def _forked() -> None:
    _process[0] = os.getpid()


os.register_at_fork(after_in_child=_forked)


class _Batches:
    """Access lines collected in memory and written in one ``write`` per batch.

    gunicorn writes each access line with its own locked, flushed ``write``: at thousands
    of requests a second that is a system call per request, and a full pipe stops the
    whole worker. Lines wait here instead, and go out every ``interval`` seconds (a
    greenlet of the worker, started on its first line, never in the master) or as soon as
    ``limit`` bytes are waiting; :meth:`flush` (worker exit, logging's shutdown, closing
    the handler) writes the rest. Mixed into a stream handler, ahead of it.
    """

    interval = 0.25
    limit = 64 * 1024
    # The stream handler's, after this class in the MRO (annotations only: no attribute).
    stream: Any
    terminator: str
    format: Callable[[logging.LogRecord], str]
    formatter: logging.Formatter | None
    handleError: Callable[[logging.LogRecord], None]  # noqa: N815 - logging's name

    def _start_batches(self) -> None:
        self._lines: list[str] = []
        self._size = 0
        self._pid: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)
            return
        self.append(message)

    def append(self, message: str) -> None:
        """Queue one formatted line (:meth:`BufferedAccessLogger.access` calls this)."""
        line = message + self.terminator
        self._lines.append(line)
        self._size += len(line)
        if self._pid != _process[0]:
            self._pid = _process[0]
            self._lines = [line]  # lines inherited from the master were its own to write
            self._size = len(line)
            # Patched by gevent in the worker: a greenlet; a daemon thread elsewhere.
            threading.Thread(target=self._drain, name="access-log", daemon=True).start()
        if self._size >= self.limit:
            self.flush()

    def _drain(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.interval)
            self.flush()

    def flush(self) -> None:
        lines, self._lines, self._size = self._lines, [], 0
        if not lines or self.stream is None:
            return
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):
            self._write_each(lines)

    def _write_each(self, lines: list[str]) -> None:
        """After a failed batch: one line that cannot be written (say, a character the
        stream's encoding lacks) loses that line only, as in gunicorn, and says so."""
        lost = 0
        for line in lines:
            try:
                self.stream.write(line)
            except (OSError, ValueError):
                lost += 1
        try:
            self.stream.flush()
            if lost:
                sys.stderr.write(f"access log: {lost} line(s) could not be written\n")
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing can go anywhere


class BufferedStreamHandler(_Batches, logging.StreamHandler):  # type: ignore[type-arg]
    """Batched access lines to a stream (``accesslog = "-"``: the shipped config)."""

    def __init__(self, stream: IO[str]) -> None:
        logging.StreamHandler.__init__(self, stream)
        self._start_batches()


class BufferedFileHandler(_Batches, logging.FileHandler):
    """Batched access lines to a file (``accesslog = "/var/log/..."``).

    gunicorn reopens its log files on ``USR1`` (``Logger.reopen_files``, for logrotate):
    it closes the handler, which writes what is waiting to the old file, then opens the
    path again, so every line lands in the file it was written during.
    """

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None,
                 errors: str | None = None) -> None:
        logging.FileHandler.__init__(self, filename, mode, encoding, errors=errors)
        self._start_batches()


class AccessAtoms:
    """The atoms of one access line, each computed when the format asks for it.

    The values are gunicorn's (``Logger.atoms`` read through its ``SafeAtoms``): an
    unknown atom is ``-``; ``{name}i``, ``{name}o`` and ``{name}e`` are a request header,
    a response header and an environ variable, the name in any case, the last one of a
    repeated name; a ``"`` in a text value is escaped.
    """

    __slots__ = ("log", "resp", "req", "environ", "request_time")
    log: Any                 # the BufferedAccessLogger (for _get_user and now)
    resp: Any                # gunicorn's Response
    req: Any                 # gunicorn's Request
    environ: dict[str, Any]
    request_time: Any        # a datetime.timedelta

    def __init__(self, log: Any, resp: Any, req: Any, environ: dict[str, Any],
                 request_time: Any) -> None:
        self.log = log
        self.resp = resp
        self.req = req
        self.environ = environ
        self.request_time = request_time

    def __getitem__(self, key: str) -> Any:
        if key.startswith("{"):
            value = self._named(key.lower())
        else:
            atom = _ATOMS.get(key)
            value = "-" if atom is None else atom(self)
        return value.replace('"', '\\"') if isinstance(value, str) else value

    def _named(self, key: str) -> Any:
        # Only the one kind asked for is looked at (the shipped format asks for one name).
        kind = key[-2:]
        pairs: Any = None
        if kind == "}i":
            pairs = getattr(self.req, "headers", self.req)
        elif kind == "}o":
            pairs = self.resp.headers
        elif kind == "}e":
            pairs = self.environ
        if pairs is None:
            return "-"
        if hasattr(pairs, "items"):
            pairs = pairs.items()
        wanted = key[1:-2]
        value: Any = "-"
        for name, found in pairs:
            if name.lower() == wanted:
                value = found  # the last one wins, as in gunicorn's dict
        return value


def _status(atoms: AccessAtoms) -> Any:
    status = atoms.resp.status
    return status.split(None, 1)[0] if isinstance(status, str) else status


def _sent(atoms: AccessAtoms) -> str:
    sent = getattr(atoms.resp, "sent", None)
    return "-" if sent is None else str(sent)


def _request_line(atoms: AccessAtoms) -> str:
    env = atoms.environ
    return f"{env['REQUEST_METHOD']} {env['RAW_URI']} {env['SERVER_PROTOCOL']}"


# The atoms of gunicorn's documentation ("access_log_format"), each a function of a line.
_ATOMS: dict[str, Callable[[AccessAtoms], Any]] = {
    "h": lambda a: a.environ.get("REMOTE_ADDR", "-"),
    "l": lambda a: "-",
    "u": lambda a: a.log._get_user(a.environ) or "-",
    "t": lambda a: a.log.now(),
    "r": _request_line,
    "s": _status,
    "m": lambda a: a.environ.get("REQUEST_METHOD"),
    "U": lambda a: a.environ.get("PATH_INFO"),
    "q": lambda a: a.environ.get("QUERY_STRING"),
    "H": lambda a: a.environ.get("SERVER_PROTOCOL"),
    "b": _sent,
    "B": lambda a: getattr(a.resp, "sent", None),
    "f": lambda a: a.environ.get("HTTP_REFERER", "-"),
    "a": lambda a: a.environ.get("HTTP_USER_AGENT", "-"),
    "T": lambda a: a.request_time.seconds,
    "D": lambda a: a.request_time.seconds * 1_000_000 + a.request_time.microseconds,
    "M": lambda a: a.request_time.seconds * 1000 + a.request_time.microseconds // 1000,
    "L": lambda a: f"{a.request_time.seconds}.{a.request_time.microseconds:06d}",
    "p": lambda a: f"<{os.getpid()}>",
}


# One ``%(name)spec`` of a format (flags, width, precision, length, conversion; no ``*``,
# which would take a value of its own), or a ``%%``.
_SPEC = re.compile(r"%(?:%|\((?P<key>[^()]*)\)(?P<spec>[-#0 +]*\d*(?:\.\d*)?[hlL]?"
                   r"[diouxXeEfFgGcrsa]))")


def _compiled(fmt: str) -> tuple[str, tuple[Callable[[AccessAtoms], Any], ...]] | None:
    """``fmt`` with each ``%(name)spec`` made a positional ``%spec``, and what computes
    each name's value, in order; ``None`` for a format this cannot take apart exactly
    (a ``%`` that is not such a spec or ``%%``): it is then applied to
    :class:`AccessAtoms` as a mapping, which gives the same line a little slower.

    The same values through the same specs make the same line: ``%`` on a tuple instead
    of a mapping only saves the lookup of each name, per line.
    """
    getters: list[Callable[[AccessAtoms], Any]] = []
    if "%" in _SPEC.sub("", fmt):
        return None

    def positional(match: re.Match[str]) -> str:
        key, spec = match.group("key"), match.group("spec")
        if key is None:
            return "%%"
        if key.startswith("{"):
            named = key.lower()
            getters.append(lambda atoms: atoms._named(named))
        else:
            getters.append(_ATOMS.get(key, _unknown))
        return "%" + spec

    return _SPEC.sub(positional, fmt), tuple(getters)


def _unknown(atoms: AccessAtoms) -> str:
    return "-"


class BufferedAccessLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger with the access log to a stream buffered
    (:class:`BufferedStreamHandler`), and each line made from the atoms its format uses
    (:class:`AccessAtoms`), for gevent workers; to a file the same
    (:class:`BufferedFileHandler`). A logger set up otherwise (another worker class,
    ``logconfig``, syslog, a handler added by the app) gets gunicorn's own path,
    unchanged."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        # One format per run: gunicorn's own lines and the access lines as the service's.
        logs.use_for_gunicorn((self.error_log, self.access_log), _log_format())
        # Read once per setup (gunicorn sets the logger up again on a reload): through
        # gunicorn's Config each read is a lookup and a validation, a sixth of a line's cost.
        self._access_format: str = cfg.access_log_format
        self._access_compiled = _compiled(self._access_format)
        if "gevent" not in str(getattr(cfg, "worker_class_str", "")):
            # The buffer takes no lock: greenlets of one worker never interleave inside
            # it, threads (gthread, sync's drain thread) could lose a line.
            return
        handlers: list[logging.Handler] = self.access_log.handlers
        for i, handler in enumerate(handlers):
            if not getattr(handler, "_gunicorn", False):
                continue
            buffered: BufferedStreamHandler | BufferedFileHandler
            if type(handler) is logging.StreamHandler:
                buffered = BufferedStreamHandler(handler.stream)
            elif type(handler) is logging.FileHandler:
                buffered = BufferedFileHandler(handler.baseFilename, handler.mode,
                                               handler.encoding, handler.errors)
                handler.close()
            else:
                continue
            buffered.setFormatter(handler.formatter)
            buffered._gunicorn = True  # type: ignore[union-attr]
            handlers[i] = buffered

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if environ.get(logs.QUIET):
            return  # the admin page's own timed reload (service.admin.routes marks it)
        log: logging.Logger = self.access_log
        handler = _only_buffer(log)
        if handler is None:
            super().access(resp, req, environ, request_time)
            return
        atoms = AccessAtoms(self, resp, req, environ, request_time)
        try:
            if self._access_compiled is None:
                line = self._access_format % atoms
            else:
                fmt, getters = self._access_compiled
                # A '"' in a text value is escaped, as AccessAtoms.__getitem__ does.
                line = fmt % tuple([value.replace('"', '\\"') if isinstance(value, str)
                                    else value for value in [get(atoms) for get in getters]])
        except Exception:  # noqa: BLE001 - as gunicorn: a bad format is reported, not raised
            self.error(traceback.format_exc())
            return
        handler.append(logs.line(handler.formatter, "gunicorn.access", line))

    def flush_access(self) -> None:
        """Write the buffered lines now (the shipped ``worker_exit`` calls it)."""
        for handler in self.access_log.handlers:
            handler.flush()


def _log_format() -> str:
    """``[server] log_format`` of the settings file (``SWR_LOG_FORMAT`` overrides it in
    :func:`service.observe.logs.chosen_format`); ``auto`` when the file cannot be read
    (the master says why elsewhere, see :mod:`service.gunicorn.reload`)."""
    from ..config import ConfigError, load_settings

    try:
        return load_settings().server.log_format
    except (ConfigError, OSError):
        return "auto"


def _only_buffer(log: logging.Logger) -> _Batches | None:
    """The buffer, when handing it the formatted line is all that logging would do with
    it: our one handler, gunicorn's ``%(message)s`` formatter, no filters, no parent
    handlers (gunicorn turns ``propagate`` off), INFO on."""
    handlers: Iterable[logging.Handler] = log.handlers
    if (len(log.handlers) != 1 or log.filters or log.propagate
            or not log.isEnabledFor(logging.INFO)):
        return None
    [handler] = handlers
    if (type(handler) not in (BufferedStreamHandler, BufferedFileHandler) or handler.filters
            or handler.level > logging.INFO or handler.formatter is None
            or not (logs.is_ours(handler.formatter) or handler.formatter._fmt == "%(message)s")):
        return None
    return cast(_Batches, handler)
