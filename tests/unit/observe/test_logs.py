"""The two log formats: ``json`` and ``text`` carry the same fields, one line per record."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator

import orjson
import pytest

from service.observe import logs

STANDARD = ("ts", "level", "logger", "pid", "msg")


def a_record() -> logging.LogRecord:
    """One record with every kind of extra field and an exception."""
    record = logging.LogRecord("service.swr", logging.ERROR, __file__, 1, "fetch failed", None,
                               None)
    extras = {
        "event": "refresh",
        "source": "primes",
        "key": logs.key_hash("primes:limit=10"),
        "outcome": "error",
        "seconds": 1.6654,
        "status": 502,
        "leased": True,
        "fenced": False,
        "holder": None,
        "detail": 'upstream said "no way"\nand C:\\tmp = full',
        "empty": "",
        "params": {"id": "7 8", "q": "a=b"},
        "servers": ["127.0.0.1:11211", "10.0.0.2:11211"],
        "odd": "line\u2028separator\ttab",
    }
    for name, value in extras.items():
        setattr(record, name, value)
    try:
        raise ValueError("origin answered 502")
    except ValueError:
        record.exc_info = sys.exc_info()
    return record


def parse_text(line: str) -> dict[str, str]:
    """Read a text line back: ts LEVEL logger [pid] message name=value ... (logfmt values)."""
    ts, level, logger, pid, rest = line.split(" ", 4)
    fields = {"ts": ts, "level": level, "logger": logger, "pid": pid.strip("[]")}
    # The message runs up to the first " name=" (the test's message has no "=").
    cut = rest.index("=")
    msg_end = rest.rindex(" ", 0, cut)
    fields["msg"] = rest[:msg_end]
    pos = msg_end + 1
    while pos < len(rest):
        eq = rest.index("=", pos)
        name = rest[pos:eq]
        pos = eq + 1
        if rest[pos] == '"':
            end = pos + 1
            while rest[end] != '"':
                end += 2 if rest[end] == "\\" else 1
            # The escapes are JSON's, so JSON reads them back.
            value = json.loads(rest[pos:end + 1])
            pos = end + 2
        else:
            end = rest.find(" ", pos)
            end = len(rest) if end < 0 else end
            value = rest[pos:end]
            pos = end + 1
        fields[name] = value
    return fields


def as_text(value: object) -> str:
    """What a JSON value reads as in the text format."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def test_text_and_json_carry_the_same_fields_for_the_same_record() -> None:
    record = a_record()
    data = json.loads(logs.JSONFormatter().format(record))
    text = parse_text(logs.TextFormatter().format(record))

    assert set(text) == set(data)
    assert {"event", "source", "key", "detail", "params", "exc"} <= set(data)
    for name in set(data) - set(STANDARD):
        assert text[name] == as_text(data[name]), name
    assert text["level"] == data["level"].upper() and text["ts"] == data["ts"]
    assert text["logger"] == data["logger"] and text["pid"] == str(data["pid"])
    assert text["msg"] == data["msg"] == "fetch failed"
    assert "ValueError: origin answered 502" in text["exc"]
    assert text["exc"] == data["exc"]


def test_a_text_record_is_one_line_whatever_its_message_fields_and_traceback() -> None:
    record = a_record()
    record.msg = "two\nlines"
    line = logs.TextFormatter().format(record)
    assert len(line.splitlines()) == 1 and "\n" not in line
    assert line.split(" ", 4)[4].startswith("two\\nlines event=refresh ")


def test_text_values_are_bare_when_plain_and_quoted_otherwise() -> None:
    line = logs.TextFormatter().format(a_record())
    for piece in (
        " event=refresh ", " source=primes ", " seconds=1.6654 ", " status=502 ",
        " leased=true ", " fenced=false ", " holder=null ", ' empty="" ',
        ' detail="upstream said \\"no way\\"\\nand C:\\\\tmp = full" ',
        ' params="{\\"id\\":\\"7 8\\",\\"q\\":\\"a=b\\"}" ',
        ' odd="line\\u2028separator\\ttab" ',
        ' exc="Traceback (most recent call last):\\n',
    ):
        assert piece in line, piece


def test_an_event_reads_the_same_in_both_formats_and_its_key_is_hashed() -> None:
    logger = logging.getLogger("tests.unit.observe.test_logs")
    out = {"json": io.StringIO(), "text": io.StringIO()}
    handlers = []
    for name, formatter in (("json", logs.JSONFormatter()), ("text", logs.TextFormatter())):
        handler = logging.StreamHandler(out[name])
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        handlers.append(handler)
    logger.setLevel(logging.INFO)
    try:
        logs.event(logger, logging.INFO, "refresh", "fetched", source="primes",
                   key="user:42 secret-token", outcome="ok", seconds=0.25, leased=True)
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
    data = json.loads(out["json"].getvalue())
    text = parse_text(out["text"].getvalue().rstrip("\n"))
    expected = {"event": "refresh", "source": "primes", "outcome": "ok", "seconds": "0.25",
                "leased": "true", "key": logs.key_hash("user:42 secret-token")}
    assert {name: text[name] for name in expected} == expected
    assert {name: as_text(data[name]) for name in expected} == expected
    assert "secret" not in out["text"].getvalue() + out["json"].getvalue()


@pytest.fixture
def service_logger() -> Iterator[logging.Logger]:
    """The ``service`` logger without handlers, restored afterwards."""
    logger = logging.getLogger("service")
    saved, level = logger.handlers[:], logger.level
    logger.handlers.clear()
    try:
        yield logger
    finally:
        logger.handlers[:] = saved
        logger.setLevel(level)


@pytest.mark.parametrize(("log_format", "formatter"),
                         [("text", logs.TextFormatter), ("json", logs.JSONFormatter)])
def test_configure_installs_the_formatter_of_the_setting(
    service_logger: logging.Logger, log_format: str, formatter: type[logging.Formatter],
) -> None:
    logs.configure(log_format)
    assert len(service_logger.handlers) == 1
    assert type(service_logger.handlers[0].formatter) is formatter


def test_configure_leaves_a_logger_the_host_app_configured_alone(
    service_logger: logging.Logger,
) -> None:
    mine = logging.NullHandler()
    service_logger.addHandler(mine)
    logs.configure("text")
    assert service_logger.handlers == [mine]


class Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("setting", "env", "ttys", "chosen"), [
    ("auto", "", (True, True), "text"),                 # make run in a terminal
    ("auto", "", (True, False), "json"),                # stderr to a file: one format, JSON
    ("auto", "", (False, False), "json"),               # a pipe, journald
    ("json", "", (True, True), "json"),                 # the setting forces one
    ("text", "", (False, False), "text"),
    ("json", "text", (False, False), "text"),           # the variable beats the setting
    ("text", " AUTO ", (False, True), "json"),
])
def test_the_format_of_a_run(monkeypatch: pytest.MonkeyPatch, setting: str, env: str,
                             ttys: tuple[bool, bool], chosen: str) -> None:
    monkeypatch.setenv(logs.FORMAT_ENV, env)
    assert logs.chosen_format(setting, tuple(Stream(t) for t in ttys)) == chosen


def test_an_unknown_format_variable_is_said_and_taken_as_auto(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(logs.FORMAT_ENV, "yaml")
    assert logs.chosen_format("text", (Stream(True), Stream(True))) == "text"
    err = capsys.readouterr().err
    assert "SWR_LOG_FORMAT='yaml'" in err and "auto, json, text" in err


def test_a_line_without_a_record_reads_as_a_record_would() -> None:
    message = '127.0.0.1 "GET /v1/primes HTTP/1.1" 200 79 x_cache=HIT'
    data = json.loads(logs.line(logs.JSONFormatter(), "gunicorn.access", message))
    assert (data["logger"], data["level"], data["msg"]) == ("gunicorn.access", "info", message)
    text = logs.line(logs.TextFormatter(), "gunicorn.access", message)
    assert text.endswith(f" INFO gunicorn.access [{os.getpid()}] {message}")
    assert logs.line(logging.Formatter("%(message)s"), "gunicorn.access", message) == message


def test_a_forked_worker_writes_its_own_pid() -> None:
    """The pid is read once per process: a gunicorn worker (a fork of the master) must not
    write the master's."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.write(write, logs.line(logs.JSONFormatter(), "gunicorn.access", "m").encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        data = os.read(read, 4096)
    finally:
        os.close(read)
        os.waitpid(child, 0)
    assert json.loads(data)["pid"] == child != os.getpid()


@pytest.mark.parametrize("message", [
    '127.0.0.1 "GET /v1/primes HTTP/1.1" 200 79 ua="curl \\"8\\""', "", "back\\slash",
    "new\nline\ttab\x00nul", "é ✓ \u2028 \U0001f600", "}\"{"])
@pytest.mark.parametrize("logger", ["gunicorn.access", 'a "quoted" name'])
def test_a_fast_line_is_byte_for_byte_the_record_s_line(message: str, logger: str) -> None:
    """The fast line is made from pieces kept between lines (the timestamp per millisecond,
    the rest of its head per logger and process): the same bytes as formatting a record."""
    record = logging.makeLogRecord({"name": logger, "levelno": logging.INFO,
                                    "levelname": "INFO", "msg": message})
    fast = logs.line(logs.JSONFormatter(), logger, message)
    ts = json.loads(fast)["ts"]
    assert fast == orjson.dumps({"ts": ts, "level": "info", "logger": logger,
                                 "pid": os.getpid(), "msg": message}).decode()
    assert json.loads(fast) == {**json.loads(logs.JSONFormatter().format(record)), "ts": ts}
    text = logs.line(logs.TextFormatter(), logger, message)
    assert text.split(" ", 1)[1] == logs.TextFormatter().format(record).split(" ", 1)[1]
