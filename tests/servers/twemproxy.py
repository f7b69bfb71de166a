"""twemproxy (Debian's nutcracker) in front of memcached servers."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from .base import (
    LOOPBACK,
    REPO_ROOT,
    STOP_TIMEOUT,
    ServerProcess,
    _reap,
    free_port,
    log_tail,
)
from .memcached import _LineReader

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


class TwemproxyProcess(ServerProcess):
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

    name = "nutcracker"
    start_timeout = TWEMPROXY_START_TIMEOUT

    @property
    def where(self) -> str:
        return self.address

    def prepare(self) -> None:
        """Write the configuration: the proxy listens here and reaches the fleet."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = twemproxy_config(
            TWEMPROXY_CONFIG.read_text(encoding="utf-8"), self.address, self.servers)
        if self.timeout_ms is not None:
            config = re.sub(r"(?m)^(\s*timeout:\s*)\d+", rf"\g<1>{self.timeout_ms}", config)
        self.config_path.write_text(config)

    def output_path(self) -> Path:
        # nutcracker logs to -o itself; its stdout/stderr (start-up errors) go beside it.
        return self.log_dir / f"twemproxy-{self.port}.out"

    def exit_report(self) -> str:
        return (f"output:\n{log_tail(self.output_path())}\n"
                f"log tail:\n{log_tail(self.log_path)}")

    def probe(self) -> tuple[bool, str]:
        # version is forwarded to a server: the proxy listens and reaches the fleet.
        return self.answers_version(), "version"

    def next_attempt(self, attempt: int) -> bool:
        self.port, self.stats_port = free_port(), free_port()
        return True

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

