"""A closed-loop HTTP load generator that times every request.

``connections`` greenlets each hold one keep-alive connection and send the next GET as
soon as the previous answer is in, until ``duration`` has passed; requests still in
flight then finish (they are part of the picture: a reader stuck behind a recompute).
For every request we keep when it started, how long it took, its status and its
``X-Cache`` header, which is what wrk's summary cannot give: the latency of the reads
made *after* the key had first been filled.

It uses gevent's sockets directly (no monkey-patching), and a deliberately small HTTP/1.1
reader (status line, headers, ``Content-Length`` body), so the client costs little CPU.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import gevent
from gevent import socket


@dataclass(frozen=True)
class Sample:
    start: float      # seconds since the load started
    latency: float    # seconds from sending the request to the end of the answer
    status: int       # HTTP status; 0 when the connection failed or timed out
    x_cache: str      # the X-Cache header ("" when absent)

    @property
    def end(self) -> float:
        return self.start + self.latency


@dataclass
class Load:
    path: str
    connections: int
    duration: float
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0  # from the start to the last answer
    started_at: float = 0.0  # time.time() when the load started


class _Connection:
    def __init__(self, host: str, port: int, request: bytes, timeout: float) -> None:
        self.host, self.port = host, port
        self.request = request
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""

    def _recv(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def get(self) -> tuple[int, str]:
        """Send the request, read the whole answer; (status, X-Cache)."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(self.request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._recv()
        head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
        status_line, *lines = head.split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise ValueError("chunked answers are not supported by this client")
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._recv()
        self.buf = self.buf[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers.get("x-cache", "")


def run(host: str, port: int, path: str, connections: int, duration: float,
        timeout: float = 60.0) -> Load:
    """Load ``path`` with ``connections`` concurrent keep-alive clients for ``duration`` s."""
    load = Load(path, connections, duration)
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "User-Agent: swr-herd-bench\r\nAccept: */*\r\n\r\n").encode()
    load.started_at = time.time()
    started = time.monotonic()
    deadline = started + duration

    def client() -> None:
        conn = _Connection(host, port, request, timeout)
        try:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    status, x_cache = conn.get()
                except (OSError, ValueError) as exc:
                    conn.close()
                    status, x_cache = 0, ""
                    if len(load.errors) < 20:
                        load.errors.append(f"{type(exc).__name__}: {exc}")
                    gevent.sleep(0.05)
                t1 = time.monotonic()
                load.samples.append(Sample(t0 - started, t1 - t0, status, x_cache))
        finally:
            conn.close()

    # The collector off while measuring: a full collection of this process (tens of
    # thousands of samples by then) would pause every client at once, and that pause
    # would be counted as the server's latency. The samples hold no cycles.
    collecting = gc.isenabled()
    gc.disable()
    greenlets = [gevent.spawn(client) for _ in range(connections)]
    try:
        gevent.joinall(greenlets, raise_error=True)
    finally:
        gevent.killall(greenlets, block=True, timeout=2.0)
        if collecting:
            gc.enable()
    load.wall = time.monotonic() - started
    return load
