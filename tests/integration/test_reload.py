"""A reload (``kill -HUP``) with a broken settings file never takes the host down.

Real gunicorn with the shipped config: the settings file is broken, the master gets HUP,
new workers boot (with the last good settings) and the host keeps answering; the log says
once which key of which file is wrong; a later HUP with a good file takes effect.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.servers import GunicornProcess, http_get

pytestmark = [pytest.mark.memcached, pytest.mark.gunicorn]


def source(name: str, origin: Any) -> str:
    return (f'[sources.{name}]\nkind = "http"\nurl = "{origin.url}/items?id={{id}}"\n'
            f"max_age = 60\n")


def names(server: GunicornProcess) -> list[str]:
    status, _, body = http_get(server.url + "/v1/", timeout=5.0)
    assert status == 200
    return sorted(s["name"] for s in json.loads(body))


def reload_and_wait(server: GunicornProcess, done: Callable[[], bool], what: str) -> None:
    """HUP the master, then wait (bounded) until every worker is a new one and ``done``."""
    old = set(server.worker_pids())
    server.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.is_running(), f"the master exited after HUP:\n{server.log_text()[-3000:]}"
        workers = set(server.worker_pids())
        if len(workers) == server.workers and not workers & old and done():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{server.log_text()[-3000:]}")


def test_a_reload_with_a_broken_settings_file_keeps_the_host_serving(
        memcached: Any, gunicorn_factory: Any, origin_server: Any, tmp_path: Path,
        key_prefix: str) -> None:
    path = tmp_path / "settings.toml"
    good = (f'[cache]\nservers = ["{memcached.address}"]\nkey_prefix = "{key_prefix}"\n'
            f'[server]\nlog_format = "text"\n' + source("one", origin_server))
    path.write_text(good)
    server: GunicornProcess = gunicorn_factory(path, workers=2)
    assert names(server) == ["one"]

    path.write_text(good.replace("[server]", 'pool_size = "many"\n[server]'))
    reload_and_wait(server, lambda: names(server) == ["one"], "new workers on the old settings")
    assert http_get(server.url + "/v1/one?id=1", timeout=5.0)[0] == 200
    said = [line for line in server.log_text().splitlines() if "settings not reloaded" in line]
    assert len(said) == 1, said                                 # once, not once per worker
    assert str(path) in said[0] and "cache.pool_size" in said[0]

    path.write_text(good + source("two", origin_server))        # fixed, and a new source
    reload_and_wait(server, lambda: names(server) == ["one", "two"], "the good file")


def test_a_run_leaves_nothing_in_the_temp_directory(
        memcached: Any, gunicorn_factory: Any, origin_server: Any, tmp_path: Path,
        key_prefix: str) -> None:
    path = tmp_path / "settings.toml"
    path.write_text(f'[cache]\nservers = ["{memcached.address}"]\nkey_prefix = "{key_prefix}"\n'
                    + source("one", origin_server))
    temp = tmp_path / "temp"
    temp.mkdir()
    # No metrics directory given: the config makes its own in the temp directory (TMPDIR
    # here); the last good settings live in the master's environment, not on disk.
    server: GunicornProcess = gunicorn_factory(
        path, workers=2, env={"TMPDIR": str(temp), "PROMETHEUS_MULTIPROC_DIR": ""})
    assert http_get(server.url + "/v1/one?id=1", timeout=5.0)[0] == 200
    assert sorted(p.name.split("-")[2] for p in temp.iterdir()) == ["metrics"]
    server.stop()
    assert list(temp.iterdir()) == []
