"""Structured logs and the blocked-hub monitor."""

from __future__ import annotations

import gc
import json
import logging
import time
from typing import Any

import gevent
import pytest
from gevent import monkey

from service import logs, metrics, monitor
from service.freshness import Windows
from service.swr import EXTENSION
from tests.conftest import settings_for, stop_hub_monitor


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
        app.extensions[EXTENSION].get_or_fetch(
            "customer:7", lambda: {"card": "4111-1111"}, Windows(60), "billing")
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
            "the logged stack does not show the call that blocked the hub (service.monitor "
            "keeps the tail of gevent's report, where the greenlet tree is, not its head, "
            "where the blocked stack is); logged:\n" + record.stack[:2000]
        )
