"""Structured logs and the blocked-hub monitor."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import gevent
import pytest
from gevent import monkey

from service import logs, metrics, monitor
from service.freshness import Windows
from service.loader import Job
from service.state import state_of
from tests.conftest import settings_for


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


def test_a_blocked_hub_is_counted_and_logged_with_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service")
    before = metrics.hub_blocked_total._value.get()
    monitor.start(threshold=0.1)
    gevent.sleep(0)      # one switch, so the tracer knows which greenlet runs (as in a worker)
    try:
        real_sleep = monkey.get_original("time", "sleep")
        deadline = time.monotonic() + 10
        # Block the hub (never yield) until the monitor, a native thread, reports it.
        while metrics.hub_blocked_total._value.get() == before and time.monotonic() < deadline:
            real_sleep(0.05)
    finally:
        gevent.config.max_blocking_time = 60.0
    assert metrics.hub_blocked_total._value.get() > before
    blocked = [r for r in caplog.records if getattr(r, "event", None) == "hub_blocked"]
    assert blocked
    assert "test_a_blocked_hub_is_counted" in blocked[0].stack
