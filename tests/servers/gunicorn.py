"""gunicorn with the shipped config, on a free port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from .base import (
    GUNICORN_START_TIMEOUT,
    LOOPBACK,
    REPO_ROOT,
    STOP_TIMEOUT,
    ServerProcess,
    _poll_intervals,
    _reap,
    child_pids,
    free_port,
    http_get,
    log_tail,
    process_state,
)

# --------------------------------------------------------------------------------------------
# gunicorn
# --------------------------------------------------------------------------------------------


def gunicorn_binary() -> str:
    """The project's gunicorn: .venv/bin/gunicorn, else the one on PATH."""
    venv = REPO_ROOT / ".venv" / "bin" / "gunicorn"
    if os.access(venv, os.X_OK):
        return str(venv)
    found = shutil.which("gunicorn")
    if found is None:
        pytest.fail("gunicorn is not installed (expected .venv/bin/gunicorn or one on PATH)")
    return found


class GunicornProcess(ServerProcess):
    """``gunicorn -c deploy/gunicorn.conf.py wsgi:app`` on a free port, from the repo root
    (``config``: another ``-c``, such as a library user's ``python:service.gunicorn.conf``;
    ``settings_path`` ``None``: no ``SERVICE_SETTINGS``, the app's own config only)."""

    def __init__(
        self,
        settings_path: Path | None,
        log_dir: Path,
        workers: int = 4,
        env: dict[str, str] | None = None,
        port: int | None = None,
        app: str = "wsgi:app",
        config: str = "deploy/gunicorn.conf.py",
    ) -> None:
        self.settings_path = settings_path
        self.app = app
        self.config = config
        self.workers = workers
        self.extra_env = dict(env or {})
        self.host = LOOPBACK
        self.port = port if port is not None else free_port()
        self.log_path = log_dir / f"gunicorn-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("gunicorn was not started")
        return self.proc.pid

    def __repr__(self) -> str:
        return f"<GunicornProcess {self.url} pid={None if self.proc is None else self.proc.pid}>"

    def command(self) -> list[str]:
        return [
            gunicorn_binary(),
            "-c",
            self.config,
            "--bind",
            f"{self.host}:{self.port}",
            "--workers",
            str(self.workers),
            self.app,
        ]

    def environment(self) -> dict[str, str]:
        """os.environ + SERVICE_SETTINGS + the caller's env.

        gunicorn >= 25.1 opens a control socket at $XDG_RUNTIME_DIR/gunicorn.ctl (else
        ~/.gunicorn/gunicorn.ctl) and unlinks it on exit, so two masters would fight over one
        path shared with the developer's own gunicorn. Each test master gets its own
        XDG_RUNTIME_DIR under the log directory (older gunicorns ignore it; an explicit
        ``control_socket`` in the config file or the caller's env still wins).
        """
        runtime_dir = self.log_path.parent / f"run-{self.port}"
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
        if self.settings_path is not None:
            env["SERVICE_SETTINGS"] = str(self.settings_path)
        else:
            env.pop("SERVICE_SETTINGS", None)
        return {**env, **self.extra_env}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    name = "gunicorn"
    start_timeout = GUNICORN_START_TIMEOUT
    poll_cap = 0.2

    @property
    def where(self) -> str:
        return self.url

    def spawn_options(self) -> dict[str, Any]:
        return {"cwd": REPO_ROOT, "env": self.environment()}

    def probe(self) -> tuple[bool, str]:
        """Ready when ``GET /healthz`` answers 200 and all workers are forked (one worker
        answering is not all of them: the master forks them one by one)."""
        try:
            status, _, _ = http_get(self.url + "/healthz", timeout=2.0)
        except OSError as exc:
            return False, f"/healthz: {exc!r}"
        if status != 200:
            return False, f"/healthz answered {status}"
        workers = len(self.worker_pids())
        return workers >= self.workers, f"{workers} of {self.workers} workers forked"

    def next_attempt(self, attempt: int) -> bool:
        # Only when the master exited because the port was taken meanwhile.
        if "in use" not in log_tail(self.log_path, 10):
            return False
        self.port = free_port()
        self.log_path = self.log_path.with_name(f"gunicorn-{self.port}.log")
        return True

    def give_up(self) -> None:
        self.stop(signal.SIGKILL, timeout=STOP_TIMEOUT)

    def worker_pids(self) -> list[int]:
        """PIDs of the master's live children (the workers), from /proc."""
        if not self.is_running():
            return []
        return child_pids(self.pid)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the master (SIGHUP reload, SIGTTIN/SIGTTOU, ...)."""
        if self.proc is None:
            raise RuntimeError("gunicorn was not started")
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` to the master and wait up to ``timeout`` s for it to exit; SIGKILL the
        master and its workers if it does not. Returns the master's exit code (negative: killed
        by that signal). Workers orphaned by a killed master are killed too."""
        if self.proc is None:
            raise RuntimeError("gunicorn was not started")
        workers = self.worker_pids()
        code = _reap(self.proc, sig, timeout)
        self._kill_orphans(workers)
        return code

    def _kill_orphans(self, pids: Sequence[int], grace: float = 5.0) -> None:
        """Wait (bounded) for former workers to go away; SIGKILL what is left."""
        deadline = time.monotonic() + grace
        remaining = list(pids)
        for delay in _poll_intervals(cap=0.1):
            remaining = [p for p in remaining if process_state(p) not in (None, "Z", "X")]
            if not remaining or time.monotonic() > deadline:
                break
            time.sleep(delay)
        for pid in remaining:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class GunicornFactory(Protocol):
    def __call__(
        self, settings_path: Path | None, workers: int = 4, env: dict[str, str] | None = None,
        app: str = "wsgi:app", config: str = "deploy/gunicorn.conf.py",
    ) -> GunicornProcess: ...


@pytest.fixture
def gunicorn_factory(tmp_path: Path) -> Iterator[GunicornFactory]:
    """Start gunicorn masters: ``gunicorn_factory(settings_path, workers=2, env={...})``.
    Whatever is still running at teardown is stopped."""
    with contextlib.ExitStack() as stack:

        def start(
            settings_path: Path | None, workers: int = 4, env: dict[str, str] | None = None,
            app: str = "wsgi:app", config: str = "deploy/gunicorn.conf.py",
        ) -> GunicornProcess:
            server = GunicornProcess(settings_path, tmp_path, workers=workers, env=env,
                                     app=app, config=config)

            def cleanup() -> None:
                if server.proc is not None:
                    server.stop()

            stack.callback(cleanup)
            return server.start()

        yield start


