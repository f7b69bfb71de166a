"""nginx (Debian's package) with the shipped ``deploy/nginx.conf``, in front of an upstream.

Each instance has a prefix directory of its own (configuration, pid, logs, cache and
temporary directories all live there) and listens on a free loopback port. The shipped file
is used as it is, except for its three lines marked ``# @user``, ``# @listen`` and
``# @upstream`` (the file's header documents that rule), so the tests run what a host runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from .base import (
    LOOPBACK,
    REPO_ROOT,
    STOP_TIMEOUT,
    ServerProcess,
    _reap,
    child_pids,
    free_port,
    log_tail,
)

NGINX_CONFIG = REPO_ROOT / "deploy" / "nginx.conf"
NGINX_START_TIMEOUT = 10.0
MARKERS = ("user", "listen", "upstream")


def nginx_binary() -> str | None:
    """Path of ``nginx`` (Debian puts it in /usr/sbin, which a non-root PATH may lack)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def require_nginx() -> str:
    """The nginx binary; fails the test on CI when it is missing, skips it elsewhere."""
    binary = nginx_binary()
    if binary is not None:
        return binary
    if os.environ.get("CI") == "true":
        pytest.fail("nginx is not installed, and CI must have it: run `make test`, which "
                    "installs it")
    pytest.skip("nginx not found; install it with `apt-get install nginx` (make test does "
                "this when run as root)")


def nginx_config(template: str, values: dict[str, str]) -> str:
    """``template`` with each line marked ``# @NAME`` replaced by the directive
    ``values[NAME]`` (kept indented; an empty value leaves a comment), every other line as
    shipped.

    :raises ValueError: a marker is missing from the file, or has no value here.
    """
    seen: set[str] = set()
    lines: list[str] = []
    for line in template.splitlines():
        found = re.search(r"#\s*@(\w+)\s*$", line)
        if found:
            name = found.group(1)
            if name not in values:
                raise ValueError(f"deploy/nginx.conf marks a line @{name}; no value given")
            indent = line[: len(line) - len(line.lstrip())]
            value = values[name]
            line = f"{indent}{value}    # @{name}" if value else f"{indent}# @{name}: unset"
            seen.add(name)
        lines.append(line)
    missing = set(values) - seen
    if missing:
        raise ValueError(f"deploy/nginx.conf has no line marked @{', @'.join(sorted(missing))}")
    return "\n".join(lines) + "\n"


class NginxProcess(ServerProcess):
    """``nginx -p PREFIX -c PREFIX/nginx.conf -g 'daemon off;'`` in front of ``upstream``
    (``host:port``), listening on a free loopback port. The master stays in the foreground
    (it is ``proc``); its workers are its children."""

    name = "nginx"
    start_timeout = NGINX_START_TIMEOUT

    def __init__(self, binary: str, prefix: Path, upstream: str,
                 template: Path = NGINX_CONFIG) -> None:
        self.binary = binary
        self.prefix = prefix
        self.upstream = upstream
        self.template = template
        self.host = LOOPBACK
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        prefix.mkdir(parents=True, exist_ok=True)
        self.log_path = prefix / "error.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def where(self) -> str:
        return self.url

    @property
    def config_path(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def __repr__(self) -> str:
        return f"<NginxProcess {self.url} -> {self.upstream}>"

    def prepare(self) -> None:
        # Root: the workers run as root too (they must reach the prefix, which lives under a
        # private temporary directory); otherwise nginx cannot switch users at all.
        user = "user root;" if os.geteuid() == 0 else ""
        self.config_path.write_text(nginx_config(self.template.read_text(), {
            "user": user, "listen": f"listen {self.host}:{self.port};",
            "upstream": f"server {self.upstream};"}))

    def command(self) -> list[str]:
        return [self.binary, "-p", f"{self.prefix}/", "-e", str(self.log_path),
                "-c", str(self.config_path), "-g", "daemon off;"]

    def output_path(self) -> Path:
        return self.prefix / "nginx.out"

    def probe(self) -> tuple[bool, str]:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                pass
        except OSError as exc:
            return False, repr(exc)
        return True, "listening"

    def next_attempt(self, attempt: int) -> bool:
        if "in use" not in log_tail(self.log_path, 10):
            return False
        self.port = free_port()
        return True

    def exit_report(self) -> str:
        return (f"error.log:\n{log_tail(self.log_path)}\n"
                f"output:\n{log_tail(self.output_path())}")

    def worker_pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return child_pids(self.proc.pid)

    def give_up(self) -> None:
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stop the master (TERM: fast shutdown) and reap it; workers left behind by a
        killed master are killed too. Returns the master's exit code."""
        if self.proc is None:
            raise RuntimeError("nginx was not started")
        workers = self.worker_pids()
        code = _reap(self.proc, sig, timeout)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return code


class NginxFactory(Protocol):
    def __call__(self, upstream: str, template: Path = NGINX_CONFIG) -> NginxProcess: ...


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[NginxFactory]:
    """Start nginx in front of an upstream: ``nginx_factory("127.0.0.1:8001")``. Skips (or
    fails on CI) when nginx is missing; whatever is still running at teardown is stopped."""
    binary = require_nginx()
    with contextlib.ExitStack() as stack:
        count = 0

        def start(upstream: str, template: Path = NGINX_CONFIG) -> NginxProcess:
            nonlocal count
            count += 1
            server = NginxProcess(binary, tmp_path / f"nginx-{count}", upstream, template)

            def cleanup() -> None:
                if server.proc is not None:
                    server.stop(timeout=STOP_TIMEOUT)

            stack.callback(cleanup)
            return server.start()

        yield start
