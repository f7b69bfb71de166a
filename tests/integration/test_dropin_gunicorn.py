"""Issue 11, end to end: an unchanged Flask-Caching app under real gunicorn with 4 gevent
workers, only its configuration switched to this project's backend: one recompute per
window for the whole fleet, instead of one per waiting client."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gevent
import pytest

from tests.integration.test_gunicorn import get

pytestmark = [pytest.mark.memcached, pytest.mark.gunicorn]
TIMEOUT = 2                    # the app's CACHE_DEFAULT_TIMEOUT: the window


def burst(url: str, n: int) -> list[tuple[int, bytes]]:
    jobs = [gevent.spawn(get, url, "/report") for _ in range(n)]
    gevent.joinall(jobs, raise_error=True, timeout=60)
    return [(j.value[0], j.value[2]) for j in jobs]


def test_an_unchanged_flask_caching_app_recomputes_once_per_window_fleet_wide(
    memcached: Any, origin_server: Any, gunicorn_factory: Any, tmp_path: Path,
    key_prefix: str,
) -> None:
    env = {
        "FLASK_CACHE_TYPE": "service.backend.MemcachedCache",
        "FLASK_CACHE_MEMCACHED_SERVERS": json.dumps([memcached.address]),
        "FLASK_CACHE_KEY_PREFIX": json.dumps(key_prefix),
        "FLASK_CACHE_DEFAULT_TIMEOUT": str(TIMEOUT),
        "FLASK_CACHE_STALE_WHILE_REVALIDATE": "60",
        "ORIGIN_URL": origin_server.url, "ORIGIN_DELAY": "0.5",
    }
    settings = tmp_path / "unused.toml"         # the app reads Flask config, not this
    settings.write_text("")
    fleet = gunicorn_factory(settings, workers=4, env=env,
                             app="tests.flask_caching_app:app")

    cold = burst(fleet.url, 40)                 # 40 clients on a cold key, 4 workers
    assert {status for status, _ in cold} == {200}
    assert len({body for _, body in cold}) == 1
    assert origin_server.count("/report") == 1  # one recompute, not one per client

    stored_at = time.monotonic()
    # The window has to pass in wall-clock time (memcached and gunicorn are real).
    time.sleep(max(0.0, TIMEOUT + 0.3 - (time.monotonic() - stored_at)))
    stale = burst(fleet.url, 40)
    assert {status for status, _ in stale} == {200}
    assert origin_server.count("/report") == 2  # exactly one recompute for this window
    # Every answer is the old value or the one recompute's (the origin numbers its
    # answers), and the old value was served to the callers that did not recompute.
    numbers = [json.loads(body)["n"] for _, body in stale]
    assert set(numbers) <= {1, 2} and numbers.count(1) >= 1
