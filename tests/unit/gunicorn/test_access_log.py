"""The shipped access logger (service.gunicorn.accesslog, named by deploy/gunicorn.conf.py) writes
exactly gunicorn's lines, and gunicorn's master can load it without importing Flask.

``BufferedAccessLogger.access`` computes only the atoms a format uses and appends the
line to its buffer itself; gunicorn builds every atom and goes through stdlib logging.
Each case compares our line with gunicorn's own ``atoms`` read through its ``SafeAtoms``
(what its ``access`` formats), for the default format, the shipped one and formats that
use every atom, named headers in any case, repeated and missing names, and quotes.
"""

from __future__ import annotations

import base64
import datetime
import io
import logging
import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

from service.gunicorn import accesslog

CONF = Path(__file__).resolve().parents[3] / "deploy" / "gunicorn.conf.py"
NOW = "[29/Nov/2026:00:00:00 +0000]"

EVERY_ATOM = ("%(h)s|%(l)s|%(u)s|%(t)s|%(r)s|%(s)s|%(m)s|%(U)s|%(q)s|%(H)s|%(b)s|%(B)s|"
              "%(f)s|%(a)s|%(T)s|%(D)s|%(M)s|%(L)s|%(p)s")
NAMED = ("%({x-cache}o)s|%({X-CACHE}o)s|%({Set-Cookie}o)s|%({user-agent}i)s|%({host}i)s|"
         "%({wsgi.url_scheme}e)s|%({REMOTE_ADDR}e)s|%({wsgi.input}e)s|%({missing}i)s|"
         "%({x-cache}z)s|%({}i)s|%(nope)s|%(H)s")
NUMBERS = "%(T)d %(D)08d %(M)d %(B)s %(s)s"


@pytest.fixture(autouse=True)
def gunicorns_own_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines compared with gunicorn's own: without the run's formatter, which wraps each
    line as the service's other lines (tests/integration/test_observability.py)."""
    monkeypatch.setattr(accesslog.logs, "use_for_gunicorn", lambda *args: None)


@pytest.fixture(scope="module")
def conf() -> Iterator[dict[str, Any]]:
    """The shipped gunicorn config, evaluated as gunicorn does, plus the logger's module."""
    # The file sets PROMETHEUS_MULTIPROC_DIR when unset: keep this process's environment.
    saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved or "/nonexistent-swr-test"
    try:
        settings = runpy.run_path(str(CONF))
    finally:
        if saved is None:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    cfg = Config()
    cfg.set("logger_class", settings["logger_class"])
    yield {**settings, "BufferedAccessLogger": cfg.logger_class,
           "BufferedStreamHandler": accesslog.BufferedStreamHandler}


def test_the_shipped_config_names_the_logger(conf: dict[str, Any]) -> None:
    assert conf["BufferedAccessLogger"] is accesslog.BufferedAccessLogger


def test_the_master_loads_it_without_the_app() -> None:
    """gunicorn imports ``logger_class`` in the master: nothing that must wait for gevent's
    patch in the worker (Flask, the app, urllib3 and its ssl) may come with it."""
    code = ("import sys, service.gunicorn.accesslog; "
            "print(sorted(m for m in ('flask', 'gevent', 'urllib3', 'ssl', 'werkzeug', "
            "'pymemcache', 'service.app', 'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=CONF.parents[1]).stdout
    assert out.strip() == "[]"


def make_logger(conf: dict[str, Any], fmt: str) -> Any:
    cfg = Config()
    cfg.set("worker_class", "gevent")
    cfg.set("accesslog", "-")
    cfg.set("access_log_format", fmt)
    logger = conf["BufferedAccessLogger"](cfg)
    logger.now = lambda: NOW          # both paths read the date through it
    return logger


def ours(logger: Any, conf: dict[str, Any]) -> Any:
    [handler] = [h for h in logger.access_log.handlers
                 if type(h) is conf["BufferedStreamHandler"]]
    handler._pid = os.getpid()        # no drain thread: the test reads the buffer
    return handler


@contextmanager
def only(logger: Any, *handlers: logging.Handler) -> Iterator[None]:
    """The access logger with these handlers only, as in gunicorn (pytest attaches its
    capture handlers to every logger that does not propagate, gunicorn's included)."""
    saved = logger.access_log.handlers
    logger.access_log.handlers = list(handlers)
    try:
        yield
    finally:
        logger.access_log.handlers = saved


def request(**changes: Any) -> tuple[Any, Any, dict[str, Any], datetime.timedelta]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET", "RAW_URI": "/v1/report?x=%22a%22", "PATH_INFO": "/v1/report",
        "QUERY_STRING": 'x="a"', "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "10.0.0.7",
        "HTTP_USER_AGENT": 'curl "8.5"', "HTTP_REFERER": "http://example.test/",
        "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"ann:secret").decode(),
        "wsgi.url_scheme": "http", "wsgi.input": object(),
    }
    environ.update(changes.pop("environ", {}))
    resp = SimpleNamespace(status="200 OK", sent=226, headers=[
        ("Content-Type", "application/json"), ("X-Cache", "STALE"), ("Set-Cookie", 'a="1"'),
        ("x-cache", "HIT")])
    req = SimpleNamespace(headers=[("HOST", "cache.test"), ("USER-AGENT", 'curl "8.5"')])
    for name, value in changes.items():
        setattr(resp, name, value)
    return resp, req, environ, datetime.timedelta(seconds=2, microseconds=45)


class Collect(logging.Handler):
    """Another handler on the way (logconfig's, an app's): keeps each message."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


def gunicorns_line(logger: Any, resp: Any, req: Any, environ: dict[str, Any],
                   request_time: datetime.timedelta) -> str:
    atoms = Logger.atoms(logger, resp, req, environ, request_time)
    return str(logger.cfg.access_log_format % logger.atoms_wrapper_class(atoms))


CASES = [
    ("gunicorn's default", Config().access_log_format, {}),
    ("shipped", None, {}),
    ("every atom", EVERY_ATOM, {}),
    ("named headers and environ", NAMED, {}),
    ("numbers", NUMBERS, {}),
    ("flags, widths and a percent sign", "%(h)-20s|%(D)+.3d|%(s).1s|%(T)#x|%(B)5s|100%%", {}),
    ("no atom at all", "plain %% text", {}),
    ("nothing sent, no user", EVERY_ATOM, {"sent": None, "environ": {
        "HTTP_AUTHORIZATION": "Bearer x", "HTTP_USER_AGENT": "ua"}}),
    ("an error status, no headers", EVERY_ATOM + NAMED, {"status": "503 SERVICE UNAVAILABLE",
                                                         "headers": []}),
]


@pytest.mark.parametrize(("fmt", "changes"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_line_is_gunicorns(conf: dict[str, Any], fmt: str | None,
                                changes: dict[str, Any]) -> None:
    logger = make_logger(conf, fmt if fmt is not None else conf["access_log_format"])
    handler = ours(logger, conf)
    resp, req, environ, request_time = request(**changes)
    with only(logger, handler):
        logger.access(resp, req, environ, request_time)
    expected = gunicorns_line(logger, resp, req, environ, request_time)
    assert handler._lines == [expected + "\n"]
    assert expected.strip("-| ")             # the case makes a line worth comparing


def test_a_logger_set_up_otherwise_takes_gunicorns_path(conf: dict[str, Any]) -> None:
    logger = make_logger(conf, conf["access_log_format"])
    handler = ours(logger, conf)
    resp, req, environ, request_time = request()
    with only(logger, handler, collect := Collect()):  # as logconfig or an app might
        logger.access(resp, req, environ, request_time)
    expected = gunicorns_line(logger, resp, req, environ, request_time)
    assert collect.seen == [expected]
    assert handler._lines == [expected + "\n"]  # through logging and the handler's emit


def test_a_format_that_fails_is_reported_not_raised(conf: dict[str, Any]) -> None:
    logger = make_logger(conf, "%(T)d %(a)d")       # a text atom as a number
    handler = ours(logger, conf)
    errors: list[str] = []
    logger.error = lambda message, *args: errors.append(message % args if args else message)
    with only(logger, handler):
        logger.access(*request())
    assert handler._lines == []
    assert len(errors) == 1 and "TypeError" in errors[0]


def test_a_propagating_access_logger_takes_gunicorns_path(conf: dict[str, Any]) -> None:
    logger = make_logger(conf, conf["access_log_format"])
    handler = ours(logger, conf)
    parent = logging.getLogger("gunicorn")
    collect = Collect()
    parent.addHandler(collect)
    logger.access_log.propagate = True             # an app's logging setup may do this
    try:
        with only(logger, handler):
            logger.access(*request())
    finally:
        logger.access_log.propagate = False
        parent.removeHandler(collect)
    assert len(collect.seen) == 1 and handler._lines == [collect.seen[0] + "\n"]


def test_threaded_workers_keep_gunicorns_handler() -> None:
    """The buffer takes no lock: only gevent workers (one thread) get it."""
    cfg = Config()
    cfg.set("worker_class", "gthread")
    cfg.set("accesslog", "-")
    logger = accesslog.BufferedAccessLogger(cfg)
    assert [type(h) for h in logger.access_log.handlers
            if getattr(h, "_gunicorn", False)] == [logging.StreamHandler]


def test_a_line_that_cannot_be_written_loses_only_itself(
        capsys: pytest.CaptureFixture[str]) -> None:
    class Ascii(io.StringIO):
        def write(self, text: str) -> int:
            text.encode("ascii")            # as a stdout whose encoding lacks a character
            return super().write(text)

    stream = Ascii()
    handler = accesslog.BufferedStreamHandler(stream)
    handler._pid = os.getpid()              # no drain thread: flushed by hand
    for line in ("first", "caf\u00e9", "last"):
        handler.append(line)
    handler.flush()
    assert stream.getvalue() == "first\nlast\n"
    assert "1 line(s) could not be written" in capsys.readouterr().err



@pytest.fixture
def file_logger(conf: dict[str, Any], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Loggers to ``tmp_path/access.log``; their files are closed afterwards."""
    made: list[Any] = []

    def make(worker_class: str = "gevent") -> Any:
        cfg = Config()
        cfg.set("worker_class", worker_class)
        cfg.set("accesslog", str(tmp_path / "access.log"))
        cfg.set("access_log_format", conf["access_log_format"])
        logger = conf["BufferedAccessLogger"](cfg)
        logger.now = lambda: NOW
        made.append(logger)
        return logger

    yield make
    for logger in made:
        for handler in logger.access_log.handlers:
            if getattr(handler, "_gunicorn", False):
                handler.close()


def gunicorn_handler(logger: Any) -> Any:
    [handler] = [h for h in logger.access_log.handlers if getattr(h, "_gunicorn", False)]
    return handler


def test_an_access_log_file_gets_gunicorns_lines_in_batches(
        file_logger: Callable[..., Any], tmp_path: Path) -> None:
    logger = file_logger()
    handler = gunicorn_handler(logger)
    assert type(handler) is accesslog.BufferedFileHandler
    handler._pid = os.getpid()              # no drain thread: flushed by hand
    resp, req, environ, request_time = request()
    with only(logger, handler):
        logger.access(resp, req, environ, request_time)
        assert (tmp_path / "access.log").read_text() == ""     # waiting in the batch
        handler.flush()
    expected = gunicorns_line(logger, resp, req, environ, request_time)
    assert (tmp_path / "access.log").read_text() == expected + "\n"


def test_reopening_the_file_on_usr1_keeps_each_line_in_its_own_file(
        file_logger: Callable[..., Any], tmp_path: Path) -> None:
    """logrotate renames the file, then gunicorn's USR1 reopens it (``reopen_files``)."""
    path = tmp_path / "access.log"
    logger = file_logger()
    handler = gunicorn_handler(logger)
    handler._pid = os.getpid()
    with only(logger, handler):
        logger.access(*request(status="200 OK"))
        path.rename(tmp_path / "access.log.1")
        logger.reopen_files()
        logger.access(*request(status="404 NOT FOUND"))
        handler.flush()
    assert '" 200 ' in (tmp_path / "access.log.1").read_text()
    assert '" 404 ' in path.read_text() and '" 200 ' not in path.read_text()


def test_threaded_workers_keep_gunicorns_file_handler(file_logger: Callable[..., Any]) -> None:
    assert type(gunicorn_handler(file_logger("gthread"))) is logging.FileHandler
