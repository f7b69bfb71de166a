"""The counting HTTP origin (tests/origin.py), run as a separate process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .base import (
    LOOPBACK,
    ORIGIN_START_TIMEOUT,
    REPO_ROOT,
    STOP_TIMEOUT,
    ServerProcess,
    _ExitedEarly,
    _reap,
    free_port,
    http_get,
    http_request,
)

# --------------------------------------------------------------------------------------------
# HTTP origin (tests/origin.py in its own process)
# --------------------------------------------------------------------------------------------


class OriginServer(ServerProcess):
    """The counting HTTP origin of ``tests/origin.py``, run as a separate process."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.log_dir = log_dir
        self.host = LOOPBACK
        self._port_pinned = port is not None
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"origin-{self.port}.log"

    def __repr__(self) -> str:
        return f"<OriginServer {self.url} pid={None if self.proc is None else self.proc.pid}>"

    name = "origin"
    start_timeout = ORIGIN_START_TIMEOUT

    @property
    def where(self) -> str:
        return self.url

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.origin", "--port", str(self.port)]

    def spawn_options(self) -> dict[str, Any]:
        return {"cwd": REPO_ROOT}

    def probe(self) -> tuple[bool, str]:
        try:
            status, _, _ = http_get(self.url + "/__count", timeout=1.0)
        except OSError as exc:
            return False, f"/__count: {exc!r}"
        return status == 200, f"/__count answered {status}"

    def next_attempt(self, attempt: int) -> bool:
        if not self._port_pinned:
            self.port = free_port()
        return True

    def counts(self) -> dict[str, object]:
        """The raw ``/__count`` document: ``{"total": N, "paths": {path: n}}``."""
        status, _, body = http_get(self.url + "/__count", timeout=5.0)
        if status != 200:
            raise RuntimeError(f"/__count answered {status}")
        doc: dict[str, object] = json.loads(body)
        return doc

    def count(self, path: str | None = None) -> int:
        """Requests seen in total, or for one path (without its query string)."""
        doc = self.counts()
        if path is None:
            total = doc["total"]
            assert isinstance(total, int)
            return total
        paths = doc["paths"]
        assert isinstance(paths, dict)
        n = paths.get(path, 0)
        assert isinstance(n, int)
        return n

    def reset(self) -> None:
        status, _, _ = http_request("POST", self.url + "/__reset", body=b"", timeout=5.0)
        if status != 200:
            raise RuntimeError(f"/__reset answered {status}")

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 5 s); the exit code, None if never started."""
        if self.proc is None:
            return None
        return _reap(self.proc, signal.SIGTERM, STOP_TIMEOUT)

    def kill(self) -> int | None:
        """SIGKILL and wait; the exit code, None if never started."""
        if self.proc is None:
            return None
        return _reap(self.proc, signal.SIGKILL, STOP_TIMEOUT)


class OriginSupply:
    """Hands out freshly started origins, each started while the test before it ran.

    Every test still gets an origin process of its own, with counts from zero and nothing in
    flight from an earlier test; it just does not wait for the interpreter to start (the
    origin's start-up is most of its cost). The spare is killed with the supply.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._spare: OriginServer | None = None

    def take(self) -> OriginServer:
        server, self._spare = self._spare, None
        if server is not None:
            try:
                server.wait_ready()
            except (_ExitedEarly, RuntimeError):
                server.kill()
                server = None
        if server is None:
            server = OriginServer(self.log_dir).start()
        self._spare = OriginServer(self.log_dir).spawn()
        return server

    def close(self) -> None:
        if self._spare is not None:
            self._spare.kill()
            self._spare = None


@pytest.fixture(scope="session")
def origin_supply(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginSupply]:
    supply = OriginSupply(tmp_path_factory.mktemp("origins"))
    try:
        yield supply
    finally:
        supply.close()


@pytest.fixture
def origin_server(origin_supply: OriginSupply) -> Iterator[OriginServer]:
    """A running counting origin of the test's own (see tests/origin.py), killed at teardown
    (its log is under the session's ``origins`` directory)."""
    server = origin_supply.take()
    try:
        yield server
    finally:
        server.kill()

