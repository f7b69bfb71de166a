"""gunicorn's access log, buffered and made from the atoms its format uses.

``logger_class = "service.accesslog.BufferedAccessLogger"`` in a gunicorn config (the
shipped ``deploy/gunicorn.conf.py`` has it). The lines are gunicorn's, byte for byte
(``tests/unit/test_access_log.py`` compares them with gunicorn's own); what changes is
what they cost:

* gunicorn builds every atom for every request (each request header, response header and
  environ variable formatted into a dict, the date...) for the handful its format uses,
  then goes through stdlib logging; here a function written once per format
  (:func:`_line_maker`) computes the atoms the format uses and nothing else, and the line
  goes straight to the buffer. Measured with the hit bench's server (wrk, 32
  connections, 4 rounds): about 20% more requests a second on every route;
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


#: The atoms of gunicorn's documentation (``access_log_format``), each an expression of
#: ``log`` (the logger: ``_get_user``, ``now``), ``resp``, ``req``, ``environ`` and ``rt``
#: (the request's time, a ``timedelta``). The values are gunicorn's (``Logger.atoms``
#: read through its ``SafeAtoms``). Expressions rather than functions: a format's line is
#: made by one function written from them (:func:`_line_maker`), a call per line instead
#: of one per atom.
_ATOM_EXPRESSIONS: dict[str, str] = {
    "h": 'environ.get("REMOTE_ADDR", "-")',
    "l": '"-"',
    "u": 'log._get_user(environ) or "-"',
    "t": "log.now()",
    "r": "f\"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {environ['SERVER_PROTOCOL']}\"",
    "s": "(resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status)",
    "m": 'environ.get("REQUEST_METHOD")',
    "U": 'environ.get("PATH_INFO")',
    "q": 'environ.get("QUERY_STRING")',
    "H": 'environ.get("SERVER_PROTOCOL")',
    "b": '("-" if getattr(resp, "sent", None) is None else str(resp.sent))',
    "B": 'getattr(resp, "sent", None)',
    "f": 'environ.get("HTTP_REFERER", "-")',
    "a": 'environ.get("HTTP_USER_AGENT", "-")',
    "T": "rt.seconds",
    "D": "rt.seconds * 1_000_000 + rt.microseconds",
    "M": "rt.seconds * 1000 + rt.microseconds // 1000",
    "L": 'f"{rt.seconds}.{rt.microseconds:06d}"',
    "p": 'f"<{os.getpid()}>"',
}
_ARGUMENTS = "log, resp, req, environ, rt"


def _named(resp: Any, req: Any, environ: dict[str, Any], key: str) -> Any:
    """``{name}i``, ``{name}o`` or ``{name}e`` (``key`` in lower case): a request header,
    a response header or an environ variable, the name in any case, the last one of a
    repeated name; ``-`` when missing or of another kind. Only the one kind asked for is
    looked at (the shipped format asks for one name)."""
    kind = key[-2:]
    pairs: Any = None
    if kind == "}i":
        pairs = getattr(req, "headers", req)
    elif kind == "}o":
        pairs = resp.headers
    elif kind == "}e":
        pairs = environ
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


def _expression(key: str) -> str:
    if key.startswith("{"):
        return f"_named(resp, req, environ, {key.lower()!r})"
    return _ATOM_EXPRESSIONS.get(key, '"-"')   # an unknown atom is "-", as in gunicorn


_NAMESPACE = {"os": os, "_named": _named}
_ATOMS: dict[str, Callable[..., Any]] = {
    key: eval(f"lambda {_ARGUMENTS}: {expression}", dict(_NAMESPACE))  # noqa: S307 - ours
    for key, expression in _ATOM_EXPRESSIONS.items()}


class AccessAtoms:
    """The atoms of one access line as a mapping, each computed when the format asks for
    it (a format :func:`_line_maker` cannot take apart): an unknown atom is ``-``; a
    ``"`` in a text value is escaped, as in gunicorn's ``SafeAtoms``."""

    __slots__ = ("log", "resp", "req", "environ", "request_time")

    def __init__(self, log: Any, resp: Any, req: Any, environ: dict[str, Any],
                 request_time: Any) -> None:
        self.log = log
        self.resp = resp
        self.req = req
        self.environ = environ
        self.request_time = request_time

    def __getitem__(self, key: str) -> Any:
        if key.startswith("{"):
            value = _named(self.resp, self.req, self.environ, key.lower())
        else:
            atom = _ATOMS.get(key)
            value = "-" if atom is None else atom(self.log, self.resp, self.req,
                                                  self.environ, self.request_time)
        return value.replace('"', '\\"') if isinstance(value, str) else value


# One ``%(name)spec`` of a format (flags, width, precision, length, conversion; no ``*``,
# which would take a value of its own), or a ``%%``.
_SPEC = re.compile(r"%(?:%|\((?P<key>[^()]*)\)(?P<spec>[-#0 +]*\d*(?:\.\d*)?[hlL]?"
                   r"[diouxXeEfFgGcrsa]))")

LineMaker = Callable[[Any, Any, Any, dict[str, Any], Any], str]


def _line_maker(fmt: str) -> LineMaker:
    """A function of ``(log, resp, req, environ, request_time)`` making ``fmt``'s line.

    When every ``%`` of ``fmt`` is a ``%(name)spec`` or ``%%``, the function is written
    for the format: each name's expression (:data:`_ATOM_EXPRESSIONS`) computed in turn,
    a ``"`` escaped in each text value, then ``fmt`` with positional specs applied to the
    tuple; the same values through the same specs make the same line as ``fmt`` applied
    to :class:`AccessAtoms`, which is what any other format gets.
    """
    if "%" in _SPEC.sub("", fmt):
        return lambda log, resp, req, environ, rt: fmt % AccessAtoms(log, resp, req,
                                                                      environ, rt)
    body: list[str] = []
    values: list[str] = []

    def positional(match: re.Match[str]) -> str:
        key, spec = match.group("key"), match.group("spec")
        if key is None:
            return "%%"
        name = f"v{len(values)}"
        body.append(f"    {name} = {_expression(key)}")
        values.append(f"({name}.replace('\"', '\\\\\"') if isinstance({name}, str) else {name})")
        return "%" + spec

    positional_fmt = _SPEC.sub(positional, fmt)
    source = "\n".join([f"def line({_ARGUMENTS}):", *body,
                        f"    return _FMT % ({', '.join(values)}{',' if values else ''})"])
    namespace = {**_NAMESPACE, "_FMT": positional_fmt}
    exec(source, namespace)  # noqa: S102 - our own expressions, the format's names quoted
    return cast(LineMaker, namespace["line"])


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
        self._access_line = _line_maker(self._access_format)
        # The run's wrapper of a line, for the buffer's formatter (looked up on the first
        # line, and again if the formatter changes).
        self._wrapped_by: logging.Formatter | None = None
        self._wrap: Callable[[str], str] = str
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
        try:
            line = self._access_line(self, resp, req, environ, request_time)
        except Exception:  # noqa: BLE001 - as gunicorn: a bad format is reported, not raised
            self.error(traceback.format_exc())
            return
        formatter = handler.formatter
        if formatter is not self._wrapped_by:
            self._wrap = logs.line_writer(formatter, "gunicorn.access")
            self._wrapped_by = formatter
        handler.append(self._wrap(line))

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
