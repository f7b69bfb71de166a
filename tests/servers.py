"""Real-process test fixtures: memcached, an HTTP origin and gunicorn.

Every server here is a real process on a free loopback port, with its output in a log file
under the test's ``tmp_path`` (under the session's temporary directory for the session's
memcached and for the origins, which are started one test ahead). Starting waits on an
observable readiness probe (a socket that answers), with bounded total time; stopping sends a
signal and then ``wait()``s the process so no zombie, open pipe or ``ResourceWarning`` is left
behind. Fixture factories register every process they start on a
:class:`contextlib.ExitStack`, so teardown stops whatever a test left running, even when the
test failed half-way.

memcached is the exception to "one process per test": ``memcached`` is one server for the whole
session, shared safely because every test gets a key prefix of its own (``key_prefix``) and sees
the server through :class:`SharedMemcached`, which refuses whatever would disturb the other
tests. A test that stops, kills, freezes, restarts or flushes memcached, or reads its global
``stats``, is marked ``@pytest.mark.private_memcached`` (or uses ``memcached_factory``) and gets
a server of its own.

Only the standard library is used to talk HTTP here, so the fixtures do not depend on the code
under test. The module works both with and without gevent monkey-patching (``subprocess``,
``socket`` and ``time.sleep`` are looked up at call time, so the patched versions are used when
the conftest patched them first).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, NoReturn, Protocol

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
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


# --------------------------------------------------------------------------------------------
# memcached
# --------------------------------------------------------------------------------------------


def memcached_binary() -> str | None:
    """Path of the memcached binary, or None when it is not installed."""
    found = shutil.which("memcached")
    if found:
        return found
    if os.access("/usr/bin/memcached", os.X_OK):
        return "/usr/bin/memcached"
    return None


def require_memcached() -> str:
    """The memcached binary; fails the test on CI when it is missing, skips it elsewhere."""
    binary = memcached_binary()
    if binary is not None:
        return binary
    if os.environ.get("CI") == "true":
        pytest.fail(
            "memcached is not installed, and CI must have it: run `make test`, which installs it"
        )
    pytest.skip(
        "memcached binary not found on PATH; install it with `apt-get install memcached` "
        "(make test does this when run as root)"
    )


class _LineReader:
    """Buffered reads of lines and exact byte counts from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("memcached closed the connection")
        self._buf += chunk

    def line(self) -> bytes:
        """One line, without its trailing CRLF."""
        while b"\r\n" not in self._buf:
            self._fill()
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data


class MemcachedProcess:
    """A memcached server process on 127.0.0.1, spoken to with the raw text protocol."""

    BASE_ARGS: tuple[str, ...] = ("-U", "0", "-m", "64", "-c", "1024", "-t", "2")

    def __init__(
        self,
        binary: str,
        log_dir: Path,
        extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.binary = binary
        self.log_dir = log_dir
        self.extra_args = list(extra_args)
        self.host = LOOPBACK
        self._port_pinned = port is not None
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"memcached-{self.port}.log"

    def command(self) -> list[str]:
        argv = [self.binary, "-l", self.host, "-p", str(self.port), *self.BASE_ARGS]
        if os.geteuid() == 0:
            # memcached refuses to run as root without naming the user to run as.
            argv += ["-u", pwd.getpwuid(0).pw_name]
        return argv + self.extra_args

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"<MemcachedProcess {self.address} pid={self.pid}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, attempts: int = 3) -> MemcachedProcess:
        """Spawn memcached and wait until it answers ``version``.

        If the process exits at once (typically: the port was taken in the meantime), it is
        retried up to ``attempts`` times: on a fresh port when none was pinned, else on the same
        port after a short pause.
        """
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except _ExitedEarly as exc:
                if attempt == attempts:
                    raise RuntimeError(str(exc)) from None
                if not self._port_pinned:
                    self.port = free_port()
                else:
                    time.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.proc = _spawn(self.command(), self.log_path)
        deadline = time.monotonic() + MEMCACHED_START_TIMEOUT
        for delay in _poll_intervals():
            if self.proc.poll() is not None:
                raise _ExitedEarly(
                    f"memcached on {self.address} exited with code {self.proc.returncode} "
                    f"before answering; log tail:\n{log_tail(self.log_path)}"
                )
            if self._answers_version():
                return
            if time.monotonic() > deadline:
                _reap(self.proc, signal.SIGKILL, STOP_TIMEOUT)
                raise RuntimeError(
                    f"memcached on {self.address} did not answer within "
                    f"{MEMCACHED_START_TIMEOUT:.0f}s; log tail:\n{log_tail(self.log_path)}"
                )
            time.sleep(delay)

    def _answers_version(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"version\r\n")
                return _LineReader(sock).line().startswith(b"VERSION")
        except OSError:  # refused, reset, timed out, closed
            return False

    def stop(self) -> int | None:
        """SIGCONT + SIGTERM, wait up to 5 s, SIGKILL if needed. Idempotent.

        Returns the exit code, or None when it was never started.
        """
        if self.proc is None:
            return None
        return _reap(self.proc, signal.SIGTERM, STOP_TIMEOUT)

    def kill(self) -> int | None:
        """SIGKILL and wait: the abrupt death of a cache node."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        return self.proc.wait(timeout=STOP_TIMEOUT)

    def freeze(self) -> None:
        """SIGSTOP: the process stays, its sockets still accept connections, nothing answers."""
        proc = self._running_proc()
        proc.send_signal(signal.SIGSTOP)
        _wait_for_state(proc.pid, want_stopped=True)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        proc = self._running_proc()
        proc.send_signal(signal.SIGCONT)
        _wait_for_state(proc.pid, want_stopped=False)

    def restart(self) -> MemcachedProcess:
        """Stop, then start again on the same port: the same address, an empty cache."""
        self.stop()
        self._port_pinned = True
        return self.start(attempts=5)

    def _running_proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        return self.proc

    # -- raw text protocol -------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self, timeout: float) -> Iterator[tuple[socket.socket, _LineReader]]:
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            yield sock, _LineReader(sock)

    def command_line(self, line: bytes, timeout: float = 5.0) -> bytes:
        """Send one command line (CRLF appended) and return the first reply line."""
        with self._connection(timeout) as (sock, reader):
            sock.sendall(line + b"\r\n")
            return reader.line()

    def flush(self, timeout: float = 5.0) -> None:
        reply = self.command_line(b"flush_all", timeout)
        if reply != b"OK":
            raise RuntimeError(f"flush_all answered {reply!r}")

    def raw_set(
        self, key: bytes, value: bytes, flags: int = 0, exptime: int = 0, timeout: float = 5.0
    ) -> None:
        """``set`` with arbitrary value bytes, bypassing any client library's encoding."""
        header = b"set %s %d %d %d\r\n" % (key, flags, exptime, len(value))
        with self._connection(timeout) as (sock, reader):
            sock.sendall(header + value + b"\r\n")
            reply = reader.line()
        if reply != b"STORED":
            raise RuntimeError(f"set {key!r} answered {reply!r}")

    def raw_get(self, key: bytes, timeout: float = 5.0) -> tuple[bytes, int] | None:
        """``get``: (value, flags), or None on a miss."""
        with self._connection(timeout) as (sock, reader):
            sock.sendall(b"get %s\r\n" % key)
            line = reader.line()
            if line == b"END":
                return None
            parts = line.split()
            if len(parts) < 4 or parts[0] != b"VALUE":
                raise RuntimeError(f"get {key!r} answered {line!r}")
            flags, size = int(parts[2]), int(parts[3])
            value = reader.exactly(size + 2)[:-2]
            end = reader.line()
        if end != b"END":
            raise RuntimeError(f"get {key!r}: expected END, got {end!r}")
        return value, flags

    def stats(self, group: str = "", timeout: float = 5.0) -> dict[str, str]:
        """``stats`` as strings: the general ones (pid, curr_items, get_hits, ...) by default,
        or a group such as ``"settings"`` (item_size_max, maxconns, ...)."""
        result: dict[str, str] = {}
        command = b"stats %s\r\n" % group.encode() if group else b"stats\r\n"
        with self._connection(timeout) as (sock, reader):
            sock.sendall(command)
            while (line := reader.line()) != b"END":
                kind, _, rest = line.partition(b" ")
                if kind != b"STAT":
                    raise RuntimeError(f"stats answered {line!r}")
                name, _, value = rest.partition(b" ")
                result[name.decode()] = value.decode()
        return result


class _ExitedEarly(RuntimeError):
    """The server process exited before it became ready."""


class MemcachedFactory(Protocol):
    def __call__(self, extra_args: Sequence[str] = ()) -> MemcachedProcess: ...


@pytest.fixture
def memcached_factory(tmp_path: Path) -> Iterator[MemcachedFactory]:
    """Start private memcached processes: ``memcached_factory(["-I", "2m"])``.

    For the tests that stop, kill, freeze, restart or flush memcached, or read its global
    ``stats``: whatever they do, no other test sees it. All are SIGKILLed at teardown (a test
    memcached holds nothing worth a graceful exit, and SIGTERM costs memcached about a second).
    """
    binary = require_memcached()
    with contextlib.ExitStack() as stack:

        def start(extra_args: Sequence[str] = ()) -> MemcachedProcess:
            server = MemcachedProcess(binary, tmp_path, extra_args=extra_args)
            stack.callback(server.kill)
            return server.start()

        yield start


# --------------------------------------------------------------------------------------------
# One memcached for the session, one key namespace per test
# --------------------------------------------------------------------------------------------

KEY_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_key_prefix_serial = itertools.count(1)
_current_key_prefix = "test"


def current_key_prefix() -> str:
    """The running test's key prefix (see the ``key_prefix`` fixture); ``"test"`` outside one."""
    return _current_key_prefix


@pytest.fixture(autouse=True)
def key_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A ``[cache] key_prefix`` of this test's own: ``t<serial>-<hash of the node id>``.

    Every test gets one (``tests.conftest.settings_for`` uses it), so tests sharing a
    memcached never read each other's keys; the serial keeps it unique even when a test runs
    twice in one session, the hash says which test wrote a key.
    """
    global _current_key_prefix
    digest = hashlib.sha1(request.node.nodeid.encode("utf-8")).hexdigest()[:8]
    prefix = f"t{next(_key_prefix_serial)}-{digest}"
    assert KEY_PREFIX_PATTERN.match(prefix), prefix
    _current_key_prefix = prefix
    try:
        yield prefix
    finally:
        _current_key_prefix = "test"


class SharedMemcachedMisuse(AssertionError):
    """A test tried to disturb the session's memcached, or to touch keys outside its prefix."""


# Text-protocol commands whose arguments up to the first number are keys.
_KEYED_COMMANDS = frozenset({
    b"get", b"gets", b"set", b"add", b"replace", b"append", b"prepend", b"cas", b"delete",
    b"incr", b"decr", b"touch", b"gat", b"gats", b"mg", b"ms", b"md", b"ma",
})


class SharedMemcached:
    """The session's memcached as one test sees it: its address and the raw protocol,
    restricted to keys under the test's prefix.

    What would disturb the other tests (stop, kill, freeze, restart, flush, the global
    ``stats``) raises :class:`SharedMemcachedMisuse`: such a test needs a private server from
    ``memcached_factory``.
    """

    def __init__(self, server: MemcachedProcess, key_prefix: str) -> None:
        self._server = server
        self.key_prefix = key_prefix
        self.host = server.host
        self.port = server.port

    @property
    def address(self) -> str:
        return self._server.address

    @property
    def pid(self) -> int | None:
        return self._server.pid

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def is_running(self) -> bool:
        return self._server.is_running()

    def __repr__(self) -> str:
        return f"<SharedMemcached {self.address} prefix={self.key_prefix!r}>"

    def _check_key(self, key: bytes) -> None:
        if not key.startswith(self.key_prefix.encode("ascii")):
            raise SharedMemcachedMisuse(
                f"key {key[:60]!r} is outside this test's prefix {self.key_prefix!r} on the "
                "session's shared memcached: build it from the test's settings (the "
                "key_prefix fixture), or use memcached_factory() for a private server"
            )

    def raw_set(
        self, key: bytes, value: bytes, flags: int = 0, exptime: int = 0, timeout: float = 5.0
    ) -> None:
        self._check_key(key)
        self._server.raw_set(key, value, flags=flags, exptime=exptime, timeout=timeout)

    def raw_get(self, key: bytes, timeout: float = 5.0) -> tuple[bytes, int] | None:
        self._check_key(key)
        return self._server.raw_get(key, timeout=timeout)

    def command_line(self, line: bytes, timeout: float = 5.0) -> bytes:
        words = line.split()
        if not words or words[0].lower() not in _KEYED_COMMANDS:
            raise SharedMemcachedMisuse(
                f"{line[:40]!r} is not a keyed command; on the session's shared memcached "
                "only commands on this test's own keys are allowed: use memcached_factory()"
            )
        for word in words[1:]:
            if word.isdigit():
                break
            self._check_key(word)
        return self._server.command_line(line, timeout=timeout)

    def stats(self, group: str = "", timeout: float = 5.0) -> dict[str, str]:
        if not group:
            self._refuse("stats")
        return self._server.stats(group, timeout=timeout)

    def _refuse(self, action: str) -> NoReturn:
        raise SharedMemcachedMisuse(
            f"memcached.{action}() on the session's shared memcached would disturb (or read) "
            "every other test's state: take a private one, `server = memcached_factory()`"
        )

    def stop(self) -> NoReturn:
        self._refuse("stop")

    def kill(self) -> NoReturn:
        self._refuse("kill")

    def freeze(self) -> NoReturn:
        self._refuse("freeze")

    def thaw(self) -> NoReturn:
        self._refuse("thaw")

    def restart(self) -> NoReturn:
        self._refuse("restart")

    def flush(self) -> NoReturn:
        self._refuse("flush")


@pytest.fixture(scope="session")
def session_memcached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemcachedProcess]:
    """One memcached for the whole run, started when a test first needs it (skipped, or failed
    on CI, when memcached is missing, exactly as ``memcached_factory``)."""
    binary = require_memcached()
    server = MemcachedProcess(binary, tmp_path_factory.mktemp("memcached"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


PRIVATE_MEMCACHED = "private_memcached"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{PRIVATE_MEMCACHED}: the test's `memcached` is a server of its own, not the "
        "session's, because it stops, kills, freezes, restarts or flushes it, or reads its "
        "global stats",
    )


@pytest.fixture
def memcached(
    request: pytest.FixtureRequest, key_prefix: str
) -> Iterator[SharedMemcached | MemcachedProcess]:
    """A running memcached with default settings.

    By default the session's, seen through :class:`SharedMemcached`: the test only reads and
    writes its own keys (under ``key_prefix``, which ``settings_for`` uses) and anything
    disruptive raises. A test marked ``@pytest.mark.private_memcached`` gets a
    :class:`MemcachedProcess` of its own from ``memcached_factory`` instead, to do as it likes
    with; so do the fixtures it uses that ask for ``memcached``.
    """
    if request.node.get_closest_marker(PRIVATE_MEMCACHED) is not None:
        factory: MemcachedFactory = request.getfixturevalue("memcached_factory")
        yield factory()
        return
    session: MemcachedProcess = request.getfixturevalue("session_memcached")
    if not session.is_running():
        # It died in an earlier test (which was failed for it): the next tests get a new one.
        session.restart()
    yield SharedMemcached(session, key_prefix)
    if not session.is_running():
        code = None if session.proc is None else session.proc.returncode
        pytest.fail(
            f"the session's memcached exited (code {code}) during this test; log tail:\n"
            f"{log_tail(session.log_path)}"
        )


# --------------------------------------------------------------------------------------------
# twemproxy (Debian's nutcracker) in front of memcached servers
# --------------------------------------------------------------------------------------------

TWEMPROXY_START_TIMEOUT = 10.0
TWEMPROXY_CONFIG = REPO_ROOT / "deploy" / "twemproxy.yml"


def nutcracker_binary() -> str | None:
    """Path of twemproxy's ``nutcracker`` (Debian puts it in /usr/sbin), or None."""
    found = shutil.which("nutcracker") or shutil.which("nutcracker", path="/usr/sbin:/sbin")
    return found


def require_nutcracker() -> str:
    """The nutcracker binary; fails the test on CI when it is missing, skips it elsewhere."""
    binary = nutcracker_binary()
    if binary is not None:
        return binary
    if os.environ.get("CI") == "true":
        pytest.fail("nutcracker is not installed, and CI must have it: run `make test`")
    pytest.skip("nutcracker (twemproxy) not found; install it with `apt-get install nutcracker` "
                "(make test does this when run as root)")


def twemproxy_config(template: str, listen: str, servers: Sequence[str]) -> str:
    """``deploy/twemproxy.yml`` with its ``listen`` address and its servers' addresses
    replaced, every other line (hashing, ejection, timeouts) kept as shipped."""
    lines: list[str] = []
    replaced = 0
    for line in template.splitlines():
        stripped = line.strip()
        if stripped.startswith("listen:"):
            line = line[: line.index("listen:")] + f"listen: {listen}"
        elif stripped.startswith("- ") and ":11211:" in stripped:
            if replaced >= len(servers):
                raise ValueError("more servers in deploy/twemproxy.yml than given")
            indent = line[: line.index("-")]
            _, weight_name = stripped[2:].split(":11211:", 1)
            line = f"{indent}- {servers[replaced]}:{weight_name}"
            replaced += 1
        lines.append(line)
    if replaced != len(servers):
        raise ValueError(f"deploy/twemproxy.yml lists {replaced} servers, not {len(servers)}")
    return "\n".join(lines) + "\n"


class TwemproxyProcess:
    """``nutcracker`` with the shipped configuration, listening on a free loopback port in
    front of the given memcached servers (their ``host:port``, in the order of the file)."""

    def __init__(self, binary: str, log_dir: Path, servers: Sequence[str],
                 timeout_ms: int | None = None) -> None:
        self.binary = binary
        self.log_dir = log_dir
        self.servers = list(servers)
        self.timeout_ms = timeout_ms
        self.host = LOOPBACK
        self.port = free_port()
        self.stats_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"twemproxy-{self.port}.log"

    @property
    def config_path(self) -> Path:
        return self.log_dir / f"twemproxy-{self.port}.yml"

    def __repr__(self) -> str:
        pid = None if self.proc is None else self.proc.pid
        return f"<TwemproxyProcess {self.address} pid={pid}>"

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path), "-s", str(self.stats_port),
                "-a", self.host, "-o", str(self.log_path), "-v", "5"]

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, attempts: int = 3) -> TwemproxyProcess:
        """Write the configuration, spawn nutcracker, wait until it answers ``version``
        (which it forwards to a server: the proxy listens and reaches the fleet)."""
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except _ExitedEarly as exc:
                if attempt == attempts:
                    raise RuntimeError(str(exc)) from None
                self.port, self.stats_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = twemproxy_config(
            TWEMPROXY_CONFIG.read_text(encoding="utf-8"), self.address, self.servers)
        if self.timeout_ms is not None:
            config = re.sub(r"(?m)^(\s*timeout:\s*)\d+", rf"\g<1>{self.timeout_ms}", config)
        self.config_path.write_text(config)
        # nutcracker logs to -o itself; its stdout/stderr (start-up errors) go beside it.
        self.proc = _spawn(self.command(), self.log_dir / f"twemproxy-{self.port}.out")
        deadline = time.monotonic() + TWEMPROXY_START_TIMEOUT
        for delay in _poll_intervals():
            if self.proc.poll() is not None:
                out = self.log_dir / f"twemproxy-{self.port}.out"
                raise _ExitedEarly(
                    f"nutcracker on {self.address} exited with code {self.proc.returncode}; "
                    f"output:\n{log_tail(out)}\nlog tail:\n{log_tail(self.log_path)}")
            if self.answers_version():
                return
            if time.monotonic() > deadline:
                _reap(self.proc, signal.SIGKILL, STOP_TIMEOUT)
                raise RuntimeError(
                    f"nutcracker on {self.address} did not answer within "
                    f"{TWEMPROXY_START_TIMEOUT:.0f}s; log tail:\n{log_tail(self.log_path)}")
            time.sleep(delay)

    def answers_version(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"version\r\n")
                return _LineReader(sock).line().startswith(b"VERSION")
        except OSError:
            return False

    def command_line(self, line: bytes, timeout: float = 5.0) -> bytes:
        """Send one command line through the proxy; the first reply line, or b"" when the
        proxy closed the connection instead of answering (what it does with a command it
        does not know)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(line + b"\r\n")
            try:
                return _LineReader(sock).line()
            except ConnectionError:
                return b""

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 5 s). Idempotent; None if never started."""
        if self.proc is None:
            return None
        return _reap(self.proc, signal.SIGTERM, STOP_TIMEOUT)


class TwemproxyFactory(Protocol):
    def __call__(self, servers: Sequence[str], timeout_ms: int | None = None
                 ) -> TwemproxyProcess: ...


@pytest.fixture
def twemproxy_factory(tmp_path: Path) -> Iterator[TwemproxyFactory]:
    """Start twemproxies: ``twemproxy_factory([m1.address, m2.address, m3.address])``, with
    ``deploy/twemproxy.yml`` (as many servers as it lists). Stopped at teardown."""
    binary = require_nutcracker()
    with contextlib.ExitStack() as stack:

        def start(servers: Sequence[str], timeout_ms: int | None = None) -> TwemproxyProcess:
            proxy = TwemproxyProcess(binary, tmp_path, servers, timeout_ms)
            stack.callback(proxy.stop)
            return proxy.start()

        yield start


# --------------------------------------------------------------------------------------------
# HTTP origin (tests/origin.py in its own process)
# --------------------------------------------------------------------------------------------


class OriginServer:
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

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, attempts: int = 3) -> OriginServer:
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except _ExitedEarly as exc:
                if attempt == attempts:
                    raise RuntimeError(str(exc)) from None
                if not self._port_pinned:
                    self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.spawn()
        self.wait_ready()

    def spawn(self) -> OriginServer:
        """Start the process without waiting for it: :meth:`wait_ready` does that."""
        argv = [sys.executable, "-m", "tests.origin", "--port", str(self.port)]
        self.proc = _spawn(argv, self.log_path, cwd=REPO_ROOT)
        return self

    def wait_ready(self) -> None:
        """Wait until the spawned origin answers ``/__count`` (bounded).

        Raises ``_ExitedEarly`` when it exited first (typically: its port was taken), and
        ``RuntimeError`` (after killing it) when it does not answer in time.
        """
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + ORIGIN_START_TIMEOUT
        for delay in _poll_intervals():
            if self.proc.poll() is not None:
                raise _ExitedEarly(
                    f"origin on {self.url} exited with code {self.proc.returncode} before "
                    f"answering; log tail:\n{log_tail(self.log_path)}"
                )
            try:
                status, _, _ = http_get(self.url + "/__count", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                _reap(self.proc, signal.SIGKILL, STOP_TIMEOUT)
                raise RuntimeError(
                    f"origin on {self.url} did not answer within {ORIGIN_START_TIMEOUT:.0f}s; "
                    f"log tail:\n{log_tail(self.log_path)}"
                )
            time.sleep(delay)

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


class GunicornProcess:
    """``gunicorn -c deploy/gunicorn.conf.py wsgi:app`` on a free port, from the repo root."""

    def __init__(
        self,
        settings_path: Path,
        log_dir: Path,
        workers: int = 4,
        env: dict[str, str] | None = None,
        port: int | None = None,
        app: str = "wsgi:app",
    ) -> None:
        self.settings_path = settings_path
        self.app = app
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
            "deploy/gunicorn.conf.py",
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
        return {
            **os.environ,
            "XDG_RUNTIME_DIR": str(runtime_dir),
            "SERVICE_SETTINGS": str(self.settings_path),
            **self.extra_env,
        }

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, attempts: int = 3) -> GunicornProcess:
        """Spawn gunicorn; wait until ``GET /healthz`` answers 200 and all workers are forked.

        If the master exits because the port was taken meanwhile, retry on a fresh port.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except _ExitedEarly as exc:
                port_taken = "in use" in log_tail(self.log_path, 10)
                if attempt == attempts or not port_taken:
                    raise RuntimeError(str(exc)) from None
                self.port = free_port()
                self.log_path = self.log_path.with_name(f"gunicorn-{self.port}.log")
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.proc = _spawn(self.command(), self.log_path, cwd=REPO_ROOT, env=self.environment())
        deadline = time.monotonic() + GUNICORN_START_TIMEOUT
        last = "no answer"
        healthy = False
        for delay in _poll_intervals(cap=0.2):
            if self.proc.poll() is not None:
                raise _ExitedEarly(
                    f"gunicorn on {self.url} exited with code {self.proc.returncode} before "
                    f"it was ready; log tail:\n{log_tail(self.log_path)}"
                )
            if not healthy:
                try:
                    status, _, _ = http_get(self.url + "/healthz", timeout=2.0)
                    healthy = status == 200
                    last = f"/healthz answered {status}"
                except OSError as exc:
                    last = f"/healthz: {exc!r}"
            if healthy:
                # One worker answering is not all of them: the master forks them one by one.
                workers = len(self.worker_pids())
                if workers >= self.workers:
                    return
                last = f"{workers} of {self.workers} workers forked"
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL, timeout=STOP_TIMEOUT)
                raise RuntimeError(
                    f"gunicorn on {self.url} not ready within {GUNICORN_START_TIMEOUT:.0f}s "
                    f"(last: {last}); log tail:\n{log_tail(self.log_path)}"
                )
            time.sleep(delay)

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
        self, settings_path: Path, workers: int = 4, env: dict[str, str] | None = None,
        app: str = "wsgi:app",
    ) -> GunicornProcess: ...


@pytest.fixture
def gunicorn_factory(tmp_path: Path) -> Iterator[GunicornFactory]:
    """Start gunicorn masters: ``gunicorn_factory(settings_path, workers=2, env={...})``.
    Whatever is still running at teardown is stopped."""
    with contextlib.ExitStack() as stack:

        def start(
            settings_path: Path, workers: int = 4, env: dict[str, str] | None = None,
            app: str = "wsgi:app",
        ) -> GunicornProcess:
            server = GunicornProcess(settings_path, tmp_path, workers=workers, env=env,
                                     app=app)

            def cleanup() -> None:
                if server.proc is not None:
                    server.stop()

            stack.callback(cleanup)
            return server.start()

        yield start


__all__ = [
    "REPO_ROOT",
    "GunicornFactory",
    "GunicornProcess",
    "MemcachedFactory",
    "MemcachedProcess",
    "OriginServer",
    "OriginSupply",
    "PRIVATE_MEMCACHED",
    "SharedMemcached",
    "SharedMemcachedMisuse",
    "TwemproxyFactory",
    "TwemproxyProcess",
    "child_pids",
    "current_key_prefix",
    "free_port",
    "gunicorn_binary",
    "gunicorn_factory",
    "http_get",
    "http_request",
    "key_prefix",
    "log_tail",
    "memcached",
    "memcached_binary",
    "memcached_factory",
    "nutcracker_binary",
    "origin_server",
    "origin_supply",
    "process_state",
    "pytest_configure",
    "require_memcached",
    "session_memcached",
    "twemproxy_factory",
]
