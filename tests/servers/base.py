"""The process base and the helpers every server of the suite uses."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Self

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

MEMCACHED_START_TIMEOUT = 10.0
ORIGIN_START_TIMEOUT = 10.0
GUNICORN_START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages ("" when missing)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _poll_intervals(start: float = 0.01, factor: float = 1.5, cap: float = 0.25) -> Iterator[float]:
    """Small, growing sleep intervals for readiness polling."""
    delay = start
    while True:
        yield delay
        delay = min(delay * factor, cap)


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


def _spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout+stderr appended to ``log_path`` and stdin from /dev/null.

    The parent's handle on the log file is closed at once: the child holds its own copy.
    """
    with _open_log(log_path) as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            close_fds=True,
        )


def _reap(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """Send ``sig`` (then SIGCONT, in case it is stopped) to a running ``proc``, wait for it
    for ``timeout`` seconds, SIGKILL it if it is still there; return its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
        # A stopped (SIGSTOPped) process keeps SIGTERM pending until it is continued.
        proc.send_signal(signal.SIGCONT)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return proc.wait()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of ``pid`` from /proc/PID/stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode("ascii"), int(fields[1])


def process_state(pid: int) -> str | None:
    """The one-letter Linux process state (R, S, T, Z, ...) of ``pid``; None if it is gone."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[0]


def child_pids(ppid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``ppid``, found by scanning /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is not None and stat[1] == ppid and stat[0] != "Z":
            children.append(int(entry))
    return sorted(children)


def _wait_for_state(pid: int, want_stopped: bool, timeout: float = 5.0) -> None:
    """Wait until ``pid`` is (or is no longer) in the stopped state ``T``."""
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + timeout
    for delay in _poll_intervals(start=0.002, cap=0.05):
        state = process_state(pid)
        if state is None or (state in ("T", "t")) == want_stopped:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} stuck in state {state!r}")
        time.sleep(delay)


def http_request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the stdlib; returns (status, headers lower-cased, body).

    A fresh connection is used and always closed. Raises OSError on connection errors and
    TimeoutError when the server does not answer within ``timeout``.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http:// URLs are supported: {url!r}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def http_get(url: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """``http_request("GET", url)``."""
    return http_request("GET", url, timeout=timeout)


class _ExitedEarly(RuntimeError):
    """The server process exited before it became ready."""


class ServerProcess:
    """What every server process of the suite shares: spawned with its output in a log
    file, ready when its probe answers (bounded by ``start_timeout``), tried again when it
    exits at once (typically: its port was taken meanwhile), stopped with a signal and
    reaped so no zombie is left.

    A server says what differs: its ``command()``, its readiness ``probe()``, where it
    listens (``where``), and what to do before another attempt (``next_attempt``).
    """

    name = "server"
    start_timeout = 10.0
    poll_cap = 0.25
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    @property
    def where(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def probe(self) -> tuple[bool, str]:
        """``(ready, what it answered)``: one bounded look, never a wait."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Before each spawn (a configuration file to write)."""

    def output_path(self) -> Path:
        return self.log_path

    def spawn_options(self) -> dict[str, Any]:
        return {}

    def next_attempt(self, attempt: int) -> bool:
        """Get ready for another start after ``attempt`` exited at once; ``False``: give up."""
        return False

    def exit_report(self) -> str:
        return f"log tail:\n{log_tail(self.log_path)}"

    def give_up(self) -> None:
        """It did not get ready in time: kill it."""
        assert self.proc is not None
        _reap(self.proc, signal.SIGKILL, STOP_TIMEOUT)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, attempts: int = 3) -> Self:
        """Spawn the server and wait until it is ready; retried up to ``attempts`` times
        when it exits at once (see :meth:`next_attempt`)."""
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        for attempt in range(1, attempts + 1):
            try:
                self.spawn()
                self.wait_ready()
                return self
            except _ExitedEarly as exc:
                if attempt == attempts or not self.next_attempt(attempt):
                    raise RuntimeError(str(exc)) from None
        raise AssertionError("unreachable")

    def spawn(self) -> Self:
        """Start the process without waiting for it: :meth:`wait_ready` does that."""
        self.prepare()
        self.proc = _spawn(self.command(), self.output_path(), **self.spawn_options())
        return self

    def wait_ready(self) -> None:
        """Poll the probe until it answers, the process exits (``_ExitedEarly``) or the
        time is up (the process is killed, ``RuntimeError``)."""
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + self.start_timeout
        last = "no answer"
        for delay in _poll_intervals(cap=self.poll_cap):
            if self.proc.poll() is not None:
                raise _ExitedEarly(
                    f"{self.name} on {self.where} exited with code {self.proc.returncode} "
                    f"before it was ready; {self.exit_report()}")
            ready, last = self.probe()
            if ready:
                return
            if time.monotonic() > deadline:
                self.give_up()
                raise RuntimeError(
                    f"{self.name} on {self.where} was not ready within "
                    f"{self.start_timeout:.0f}s (last: {last}); log tail:\n"
                    f"{log_tail(self.log_path)}")
            time.sleep(delay)
