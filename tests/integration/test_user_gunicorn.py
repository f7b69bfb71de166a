"""A user's own app under gunicorn with only ``-c python:service.gunicorn.conf``: its
``/metrics`` and its admin's statistics count the whole host (both workers), and the run
leaves nothing in the temp directory."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.servers import current_key_prefix, http_get, http_request

pytestmark = [pytest.mark.memcached, pytest.mark.gunicorn]
TOKEN = "user-app-admin-token"
WAIT = 15.0  # a worker hands its counts over within a second (metrics.FLUSH_INTERVAL)


def reports_counted(metrics_text: str) -> float:
    """``cache_requests_total`` of the ``report`` view, over every result."""
    pattern = re.compile(r'^cache_requests_total\{([^}]*)\} ([0-9.e+]+)$', re.M)
    return sum(float(value) for labels, value in pattern.findall(metrics_text)
               if 'source="report"' in labels)


def admin_counted(url: str) -> float:
    status, _, body = http_request("GET", url + "/admin/api/stats",
                                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    source = json.loads(body)["sources"].get("report")
    return float(source["requests"]["total"]) if source else 0.0


def eventually(read: Any, expected: float) -> float:
    """``read()`` once it equals ``expected`` (bounded by WAIT), else its last value."""
    deadline = time.monotonic() + WAIT
    while True:
        value = read()
        if value == expected or time.monotonic() > deadline:
            return float(value)
        time.sleep(0.1)


def test_metrics_and_admin_count_both_workers_and_nothing_is_left_behind(
        memcached: Any, gunicorn_factory: Any, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = gunicorn_factory(None, workers=2, app="tests.user_app:app",
                              config="python:service.gunicorn.conf", env={
                                  "TMPDIR": str(tmp), "SERVICE_ADMIN_TOKEN": TOKEN,
                                  "USER_APP_MEMCACHED": memcached.address,
                                  "USER_APP_PREFIX": current_key_prefix(),
                                  "PROMETHEUS_MULTIPROC_DIR": ""})
    # The master made its metrics directory where the temp directory is.
    assert (tmp / f"swr-cache-metrics-{server.pid}").is_dir(), sorted(tmp.iterdir())

    workers: set[str] = set()
    sent = 0
    while len(workers) < 2 and sent < 500:  # new connections: both workers get some
        status, headers, _ = http_get(server.url + "/report")
        assert status == 200
        workers.add(headers["x-worker"])
        sent += 1
    assert len(workers) == 2, f"one worker answered all {sent} requests"

    scraped = eventually(lambda: reports_counted(http_get(server.url + "/metrics")[2].decode()),
                         sent)
    assert scraped == sent, "/metrics shows one worker's counts, not the host's"
    assert eventually(lambda: admin_counted(server.url), sent) == sent
    status, _, body = http_get(server.url + "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ok"

    # A worker that exits: its live gauges go (child_exit), its counts stay the host's.
    metrics_dir = tmp / f"swr-cache-metrics-{server.pid}"
    gone = int(sorted(workers)[0])
    live = metrics_dir / f"gauge_livesum_{gone}.db"
    assert live.exists(), sorted(p.name for p in metrics_dir.iterdir())
    os.kill(gone, signal.SIGTERM)
    deadline = time.monotonic() + WAIT
    while live.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live.exists(), "child_exit left the dead worker's live gauges"
    assert reports_counted(http_get(server.url + "/metrics")[2].decode()) == sent
    # The master replaces it; stopped mid-boot a worker may hold the stop up for the
    # graceful timeout, so the replacement answers first.
    answered: set[str] = set()
    deadline = time.monotonic() + WAIT
    while not answered - workers and time.monotonic() < deadline:
        answered.add(http_get(server.url + "/healthz")[1]["x-worker"])
    assert answered - workers, "no replacement worker answered"

    assert server.stop() == 0
    assert sorted(tmp.iterdir()) == [], "the run left files in the temp directory"
