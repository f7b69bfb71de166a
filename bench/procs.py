"""The bench's own memcached and gunicorn, as child processes on free loopback ports.

Each is started in a session of its own, so a Ctrl-C typed at the terminal reaches only
the bench, which then stops them in order: SIGTERM, a bounded wait, then SIGKILL of the
process group it created (gunicorn's workers included). Output goes to log files in the
bench's temporary directory; their tails are shown when something does not start.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# The same process helpers the test fixtures use (bench.composite imports them too).
from tests.servers import child_pids, free_port, log_tail

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A blocking GET; only used while no load runs (start-up, counters, metrics)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Child:
    """A child process in its own session, with its output in ``log_path``."""

    name = "child"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=cwd, start_new_session=True, close_fds=True,
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.proc.returncode}; log tail:\n"
                f"{log_tail(self.log_path)}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the whole process group."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # The group is the session this process leads: only what we started is in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


class Memcached(Child):
    name = "memcached"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir / "memcached.log")
        self.port = free_port()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 10.0) -> Memcached:
        binary = shutil.which("memcached")
        if binary is None:
            raise RuntimeError("memcached is not installed (sudo apt-get install memcached)")
        self.spawn([binary, "-l", LOOPBACK, "-p", str(self.port), "-U", "0", "-m", "64",
                    "-c", "4096", "-u", getpass.getuser()])
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1.0) as sock:
                    sock.sendall(b"version\r\n")
                    if sock.recv(64).startswith(b"VERSION"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"memcached on {self.address} did not answer in {timeout}s")
            time.sleep(0.05)


def gunicorn_binary() -> str:
    here = Path(sys.executable).parent / "gunicorn"
    if os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("gunicorn")
    if found is None:
        raise RuntimeError("gunicorn not found next to this python nor on PATH")
    return found


SHIPPED_CONFIG = REPO_ROOT / "deploy" / "gunicorn.conf.py"


class Gunicorn(Child):
    """``gunicorn -c deploy/gunicorn.conf.py --workers N --bind ... bench.herd_app:app``;
    another config file with ``config`` (the bench's variants), or with ``stock`` stock
    ``gunicorn -k gevent`` and nothing else (an empty config file: no access log)."""

    name = "gunicorn"

    def __init__(self, workdir: Path, settings_path: Path, workers: int,
                 env: dict[str, str], metrics: bool = False,
                 app: str = "bench.herd_app:app", config: Path | None = None,
                 stock: bool = False) -> None:
        super().__init__(workdir / "gunicorn.log")
        self.app = app
        self.stock = stock
        if stock:
            # Empty, rather than none: gunicorn would read a ./gunicorn.conf.py if one
            # appeared in the directory it starts in.
            config = workdir / "stock.conf.py"
            config.write_text("# stock gunicorn: every setting its default\n",
                              encoding="utf-8")
        self.config = config or SHIPPED_CONFIG
        self.workdir = workdir
        self.settings_path = settings_path
        self.workers = workers
        self.extra_env = env
        self.metrics = metrics
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The bench decides bind and workers; nothing from the caller's shell overrides it.
        for name in ("GUNICORN_CMD_ARGS", "SERVICE_BIND", "SERVICE_WORKERS"):
            env.pop(name, None)
        runtime = self.workdir / "run"           # gunicorn >= 25 puts its control socket
        runtime.mkdir(mode=0o700, exist_ok=True)  # in $XDG_RUNTIME_DIR: keep it private
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.metrics:
            # /metrics merged over the workers. It costs: every counter update writes
            # to an mmapped file (about -25% requests/s on a 2-CPU VM), so it is opt-in.
            metrics = self.workdir / "prometheus"
            metrics.mkdir(exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        env.update({
            "SERVICE_SETTINGS": str(self.settings_path),
            "XDG_RUNTIME_DIR": str(runtime),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
            **self.extra_env,
        })
        return env

    def start(self, timeout: float = 30.0) -> Gunicorn:
        self.spawn([gunicorn_binary(), "-c", str(self.config),
                    *(["--worker-class", "gevent"] if self.stock else []),
                    "--workers", str(self.workers), "--bind", f"{LOOPBACK}:{self.port}",
                    self.app], env=self.environment(), cwd=REPO_ROOT)
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            self.check_alive()
            try:
                status, _ = http_get(self.url + "/healthz", timeout=1.0)
                last = f"/healthz answered {status}"
                if status == 200:
                    # One worker answering is not all of them: they boot one by one.
                    forked = len(child_pids(self.proc.pid))
                    last = f"{forked} of {self.workers} workers forked"
                    if forked >= self.workers:
                        return self
            except OSError as exc:
                last = f"/healthz: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn not ready in {timeout:.0f}s ({last}); log tail:\n"
                                   f"{log_tail(self.log_path)}")
            time.sleep(0.1)
