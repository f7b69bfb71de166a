"""Structured logs and the blocked-hub monitor."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import gevent.events
import pytest
from gevent import monkey

from service.flask.state import state_of
from service.observe import logs, metrics, monitor
from service.readpath.freshness import Windows
from service.readpath.loader import Job
from tests.conftest import settings_for, stop_hub_monitor
from tests.servers import http_request
from tests.servers.base import REPO_ROOT
from tests.servers.gunicorn import GunicornProcess


def test_json_lines_carry_the_event_and_a_hashed_key_never_the_value() -> None:
    record = logging.LogRecord("service.swr", logging.INFO, __file__, 1, "fetched", None, None)
    record.event = "refresh"
    record.key = logs.key_hash("user:42 secret-token")
    line = logs.JSONFormatter().format(record)
    data = json.loads(line)
    assert data["event"] == "refresh" and data["msg"] == "fetched"
    assert data["level"] == "info" and data["logger"] == "service.swr"
    assert len(data["key"]) == 16 and "secret" not in line


@pytest.mark.memcached
def test_a_refresh_logs_one_event_without_the_value(memcached: Any, make_app: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(settings_for([memcached.address]))
    caplog.set_level(logging.INFO, logger="service")
    with app.app_context():
        state_of(app).region.get_or_load(
            Job("customer:7", lambda: {"card": "4111-1111"}, Windows(60), source="billing"))
    events = [r for r in caplog.records if getattr(r, "event", None) == "refresh"]
    assert len(events) == 1
    line = logs.JSONFormatter().format(events[0])
    data = json.loads(line)
    assert data["source"] == "billing" and data["outcome"] == "ok"
    assert data["key"] == logs.key_hash("customer:7")
    assert "4111" not in line and "customer:7" not in line


def block_the_hub_until_reported(records: list[logging.LogRecord], since: int,
                                 timeout: float) -> list[logging.LogRecord]:
    """Block the hub (never yield to it) until the monitor, a native thread, logs a
    ``hub_blocked`` event after ``records[since]``; return those events ([] on timeout).

    While this runs nothing else can run on the hub, so every event logged meanwhile is
    about this very call, and its stack must show this function.
    """
    real_sleep = monkey.get_original("time", "sleep")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reported = [r for r in records[since:] if getattr(r, "event", None) == "hub_blocked"]
        if reported:
            return reported
        real_sleep(0.05)
    return []


def test_a_blocked_hub_is_counted_and_logged_with_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service")
    # gevent's report starts with the blocked stack and ends with every thread's stack and a
    # tree of every greenlet object in the process; the service logs only the report's last
    # 4000 characters, so unreachable greenlets earlier tests left for the collector would
    # push this test's stack out of the log line. Collect them first.
    gc.collect()
    saved = gevent.config.max_blocking_time, gevent.config.print_blocking_reports
    before = metrics.hub_blocked_total._value.get()
    since = len(caplog.records)
    monitor.start(threshold=0.1)
    try:
        gevent.sleep(0)  # one switch, so the tracer knows which greenlet runs (as in a worker)
        reported = block_the_hub_until_reported(caplog.records, since, timeout=10)
    finally:
        stop_hub_monitor()
        gevent.config.max_blocking_time, gevent.config.print_blocking_reports = saved
    assert reported, "the monitor logged no hub_blocked event within 10 s of blocking"
    assert metrics.hub_blocked_total._value.get() >= before + len(reported)
    for record in reported:
        assert record.blocking_time == pytest.approx(0.1)
        assert "block_the_hub_until_reported" in record.stack, (
            "the logged stack does not show the call that blocked the hub (service.observe.monitor "
            "keeps the tail of gevent's report, where the greenlet tree is, not its head, "
            "where the blocked stack is); logged:\n" + record.stack[:2000]
        )


# -- the hub monitor keeps the frame that blocked ---------------------------------------------


def blocked_stack(depth: int) -> list[str]:
    """``traceback.format_stack`` entries, outermost first, ``depth`` distinct frames deep;
    the last one is the call that blocks the hub."""
    frames = [f'  File "/srv/app/layer{n}.py", line {n + 1}, in layer_{n}\n    layer_{n + 1}()\n'
              for n in range(depth - 1)]
    frames.append('  File "/srv/app/report.py", line 42, in innermost_blocking_call\n'
                  '    asyncio.run(fan_out())\n')
    return frames


def gevent_report(stack: list[str], info_lines: int = 500) -> list[str]:
    """A report shaped like gevent's (``_tracer.did_block_hub_report``): heading, the hub
    thread's stack outermost-first as one element, then a long ``Info:`` section."""
    return [
        "=" * 80,
        "\n2026-01-01T12:00:00Z : Greenlet <Greenlet \"handler\"> appears to be blocked",
        "    Reported by <GreenletTracer>",
        "Blocked Stack (for thread id 0x7f00):",
        "".join(stack),
        "Info:",
        *[f"Thread 0x{n:x} (worker {n})\n  File \"x.py\", line {n}, in idle" for n in
          range(info_lines)],
    ]


def test_the_logged_stack_keeps_the_innermost_frames_of_a_long_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stack = blocked_stack(300)
    assert len("".join(stack)) > 2 * monitor.STACK_MAX_CHARS   # really a long report
    caplog.set_level(logging.WARNING, logger="service")
    before = metrics.hub_blocked_total._value.get()

    monitor.on_event(gevent.events.EventLoopBlocked(
        "<Greenlet handler>", 0.5, gevent_report(stack)))

    assert metrics.hub_blocked_total._value.get() == before + 1
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "hub_blocked"]
    logged: str = record.stack
    lines = logged.splitlines()
    assert lines[0] == "Blocked Stack (for thread id 0x7f00):"
    assert lines[1].startswith("  ... ") and "outer frames cut" in lines[1]
    assert lines[2].startswith("  File ")           # cut at a frame boundary
    # The frame that blocked, and the one that called it, are there; the outermost are not.
    assert "in innermost_blocking_call" in lines[-2] and "asyncio.run" in lines[-1]
    assert "in layer_298" in logged
    assert "in layer_0\n" not in logged and "in layer_200\n" not in logged
    assert "Info:" not in logged and "Thread 0x" not in logged
    assert len(lines) <= monitor.STACK_MAX_LINES + 2
    assert len(logged) <= monitor.STACK_MAX_CHARS + 200
    assert record.greenlet == "<Greenlet handler>"


def test_a_short_stack_is_logged_whole_and_a_report_of_another_shape_keeps_its_tail() -> None:
    stack = blocked_stack(3)
    whole = monitor.blocking_stack(gevent_report(stack))
    assert whole == "Blocked Stack (for thread id 0x7f00):\n" + "".join(stack).rstrip("\n")
    assert "cut" not in whole

    plain = [f"line {n}" for n in range(1000)]
    tail = monitor.blocking_stack(plain, max_lines=10, max_chars=8000).splitlines()
    assert tail == ["  ... 990 line(s) of outer frames cut ...",
                    *[f"line {n}" for n in range(990, 1000)]]
    by_size = monitor.blocking_stack(plain, max_lines=60, max_chars=40).splitlines()
    assert by_size[-1] == "line 999" and sum(len(x) + 1 for x in by_size[1:]) <= 40
    huge = monitor.blocking_stack("x" * 20000 + "END", max_chars=100)
    assert huge.endswith("END") and len(huge.splitlines()[-1]) == 100


# -- /metrics ------------------------------------------------------------------------------------


def test_metrics_content_type_is_exact_with_one_charset(make_app: Any) -> None:
    app = make_app(settings_for(["127.0.0.1:1"]))
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE cache_requests_total counter" in response.data


def test_metrics_answers_openmetrics_when_asked_with_its_own_content_type(make_app: Any) -> None:
    app = make_app(settings_for(["127.0.0.1:1"]))
    response = app.test_client().get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    content_type = response.headers["Content-Type"]
    assert content_type.startswith("application/openmetrics-text; version=")
    assert content_type.count("charset=utf-8") == 1
    assert response.data.endswith(b"# EOF\n")


# -- lines people can read -------------------------------------------------------------------

@pytest.mark.memcached
def test_a_library_app_without_logging_config_says_where_and_why(
        memcached_factory: Any) -> None:
    """A Flask developer's app, no logging config at all (Python's last-resort handler
    prints the message alone): memcached goes away, and each line names the server and
    the reason by itself."""
    server = memcached_factory()
    app = subprocess.Popen([sys.executable, "-m", "tests.library_app", server.address],
                           cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline().split() == ["first", "MISS"]
        assert app.stdout.readline().strip() == "ready"
        server.kill()
        app.stdin.write("go\n")
        app.stdin.flush()
        out, err = app.communicate(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    assert app.returncode == 0 and out.split()[-1] == "done", (out, err)
    assert "after 200 MISS" in out                     # served without memcached
    lines = err.splitlines()
    assert lines, "memcached went away and nothing was said"
    assert "is unreachable" in lines[0] and "CACHE_MEMCACHED_SERVERS" in lines[0]
    for line in lines:  # each: what (the command), where (the server), why (the errno)
        assert f"memcached {server.address} is unreachable (connection: " in line or \
            re.match(rf"memcached \w+ failed on {re.escape(server.address)}: connection: ",
                     line), f"a line that does not say what, where and why: {line!r}"
        assert "Connection refused" in line and "()" not in line


def gunicorn_lines(text: str) -> list[str]:
    # A terminal ends lines with \r\n.
    return [line.rstrip("\r") for line in text.splitlines() if line.strip()]


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|"
                       r"CRITICAL) [\w.]+ \[\d+\] \S")


def serve_a_little(server: Any, token: str) -> None:
    """Requests whose lines the run must show (and the admin page's polling, which it
    must not)."""
    bearer = {"Authorization": f"Bearer {token}"}
    poll = {**bearer, "X-SWR-Admin-Poll": "1"}
    for path, headers in [("/v1/primes?limit=50", {}), ("/v1/primes?limit=50", {}),
                          ("/admin/api/stats?by=click", bearer),
                          ("/admin/api/stats?by=timer", poll),
                          ("/admin/api/entries?by=timer", poll),
                          ("/admin/api/stats?by=stranger", {"X-SWR-Admin-Poll": "1"})]:
        http_request("GET", server.url + path, headers=headers)


def shipped_settings(tmp_path: Path, memcached: Any, key_prefix: str) -> Path:
    """The repository's settings.toml (the shipped demo), on the test's memcached."""
    text = (REPO_ROOT / "settings.toml").read_text(encoding="utf-8")
    text = re.sub(r'(?m)^servers = .*$', f'servers = ["{memcached.address}"]', text, count=1)
    text = re.sub(r'(?m)^key_prefix = .*$', f'key_prefix = "{key_prefix}"', text, count=1)
    assert memcached.address in text and key_prefix in text
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    return path


def wait_for_lines(server: Any, needle: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := server.log_text()):
        assert time.monotonic() < deadline, f"no {needle!r} in:\n{text[-3000:]}"
        gevent.sleep(0.05)
    return text


@pytest.mark.memcached
@pytest.mark.gunicorn
def test_gunicorn_writing_to_a_pipe_writes_json_only_and_leaves_the_polling_out(
        tmp_path: Path, memcached: Any, gunicorn_factory: Any, key_prefix: str) -> None:
    server = gunicorn_factory(shipped_settings(tmp_path, memcached, key_prefix), workers=2,
                              env={"SERVICE_ADMIN_TOKEN": "log-token",
                                   "SWR_LOG_FORMAT": ""})
    serve_a_little(server, "log-token")
    wait_for_lines(server, "by=stranger")
    server.stop()
    records = []
    for line in gunicorn_lines(server.log_text()):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    loggers = {r["logger"] for r in records}
    assert {"gunicorn.error", "gunicorn.access", "service.readpath.loader"} <= loggers
    assert all({"ts", "level", "logger", "pid", "msg"} <= set(r) for r in records)
    access = [r["msg"] for r in records if r["logger"] == "gunicorn.access"]
    assert len([a for a in access if "/v1/primes?limit=50" in a]) == 2
    assert [a for a in access if "/admin/" in a] == [
        a for a in access if "by=click" in a or "by=stranger" in a]   # the polling is not
    assert len([a for a in access if "/admin/" in a]) == 2
    assert any("x_cache=MISS" in a for a in access) and any("x_cache=HIT" in a for a in access)


@pytest.mark.memcached
@pytest.mark.gunicorn
def test_a_library_app_under_the_shipped_hooks_writes_one_format_too(
        tmp_path: Path, memcached: Any, gunicorn_factory: Any, key_prefix: str) -> None:
    """The app has no logging config: its lines take the run's format (JSON here) like
    gunicorn's, INFO included (Python's last resort would print WARNING and up, bare)."""
    settings = tmp_path / "settings.toml"
    settings.write_text(f'[cache]\nservers = ["{memcached.address}"]\n'
                        f'key_prefix = "{key_prefix}"\n', encoding="utf-8")
    server = gunicorn_factory(settings, workers=1, app="tests.library_app:app",
                              env={"LIBRARY_APP_MEMCACHED": memcached.address,
                                   "LIBRARY_APP_PREFIX": key_prefix, "SWR_LOG_FORMAT": ""})
    assert http_request("GET", server.url + "/report/3")[0] == 200
    wait_for_lines(server, "/report/3")
    server.stop()
    records = [json.loads(line) for line in gunicorn_lines(server.log_text())]
    fetched = [r for r in records if r.get("event") == "refresh"]
    assert len(fetched) == 1 and fetched[0]["msg"].startswith("report: fetched in"), records
    assert {"gunicorn.error", "gunicorn.access"} <= {r["logger"] for r in records}


class TerminalGunicorn(GunicornProcess):
    """gunicorn as ``make run`` in a terminal: its stdout and stderr are a pseudo-terminal,
    and the log file gets what that terminal shows (copied by a greenlet)."""

    copier: gevent.Greenlet | None = None

    def spawn(self) -> TerminalGunicorn:
        self.prepare()
        master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=slave, stderr=slave, close_fds=True,
                                         **self.spawn_options())
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.copier = gevent.spawn(self._copy, master)
        return self

    def _copy(self, master: int) -> None:
        gevent.os.make_nonblocking(master)
        try:
            with open(self.log_path, "ab") as log:
                while chunk := gevent.os.nb_read(master, 65536):
                    log.write(chunk)
                    log.flush()
        except OSError:
            pass  # EIO: every process that had the terminal open has exited
        finally:
            os.close(master)


@pytest.mark.memcached
@pytest.mark.gunicorn
def test_gunicorn_on_a_terminal_writes_text_only(tmp_path: Path, memcached: Any,
                                                 key_prefix: str) -> None:
    server = TerminalGunicorn(shipped_settings(tmp_path, memcached, key_prefix), tmp_path,
                              workers=1, env={"SERVICE_ADMIN_TOKEN": "log-token",
                                              "SWR_LOG_FORMAT": ""})
    try:
        server.start()
        serve_a_little(server, "log-token")
        wait_for_lines(server, "by=stranger")
    finally:
        if server.proc is not None:
            server.stop()
        if server.copier is not None:
            server.copier.join(timeout=10)
            server.copier.kill()
    lines = gunicorn_lines(server.log_text())
    bad = [line for line in lines if not TEXT_LINE.match(line)]
    assert not bad, f"lines that are not text lines: {bad}"
    assert any(" gunicorn.error " in line for line in lines)
    assert any(" service.readpath.loader " in line and "primes: fetched in" in line
               for line in lines)
    access = [line for line in lines if " gunicorn.access " in line
              and ("/v1/" in line or "/admin/" in line)]         # not the probe's /healthz
    assert len(access) == 4 and not [a for a in access if "by=timer" in a]
