"""memcached for the tests: private processes, and the session's one, shared safely."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn, Protocol

import pytest

from .base import (
    LOOPBACK,
    MEMCACHED_START_TIMEOUT,
    STOP_TIMEOUT,
    ServerProcess,
    _reap,
    _wait_for_state,
    free_port,
    log_tail,
)

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


class MemcachedProcess(ServerProcess):
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

    name = "memcached"
    start_timeout = MEMCACHED_START_TIMEOUT

    @property
    def where(self) -> str:
        return self.address

    def probe(self) -> tuple[bool, str]:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"version\r\n")
                return _LineReader(sock).line().startswith(b"VERSION"), "version"
        except OSError as exc:  # refused, reset, timed out, closed
            return False, f"version: {exc!r}"

    def next_attempt(self, attempt: int) -> bool:
        # On a fresh port when none was pinned, else on the same port after a short pause.
        if not self._port_pinned:
            self.port = free_port()
        else:
            time.sleep(0.1 * attempt)
        return True

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

