"""Real gunicorn with deploy/gunicorn.conf.py, one gevent worker: a keep-alive connection
whose requests are always already waiting must not keep the worker's other connections
waiting (``service.worker.post_request``)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import gevent
import pytest

pytestmark = [pytest.mark.memcached, pytest.mark.gunicorn]

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
STATUS_LINE = b"HTTP/1.1 200 "
PIPELINED = 3000


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (head and a Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed in the body"
        body += chunk
    assert len(body) == length, "one response at a time: nothing else was asked"
    return head


def test_a_connection_with_requests_always_waiting_does_not_starve_the_others(
    tmp_path: Path, memcached: Any, key_prefix: str, gunicorn_factory: Any
) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text(f'[cache]\nservers = ["{memcached.address}"]\n'
                        f'key_prefix = "{key_prefix}"\n')
    server = gunicorn_factory(settings, workers=1)
    busy = socket.create_connection((server.host, server.port), timeout=60)
    other = socket.create_connection((server.host, server.port), timeout=60)
    received = bytearray()
    reader: gevent.Greenlet | None = None
    try:
        # Both connections accepted and answered once: each has its greenlet in the worker.
        for sock in (busy, other):
            sock.sendall(REQUEST)
            assert read_response(sock).startswith(STATUS_LINE)

        def drain() -> None:
            # Read the busy connection's answers as they come, so its greenlet never
            # waits on a full socket buffer (which would give the others a turn anyway).
            while received.count(STATUS_LINE) < PIPELINED:
                chunk = busy.recv(65536)
                if not chunk:
                    return
                received.extend(chunk)

        reader = gevent.spawn(drain)
        # Pipelined: every next request is already in the worker's buffer when the
        # previous answer is out, so that connection's greenlet never has to wait.
        busy.sendall(REQUEST * PIPELINED)
        other.sendall(REQUEST)
        assert read_response(other).startswith(STATUS_LINE)
        answered_before_other = received.count(STATUS_LINE)
        reader.join(timeout=60)
        assert received.count(STATUS_LINE) == PIPELINED   # nothing of the busy one lost
        # Without the per-request yield, the other connection is answered only after all
        # of the busy one's requests (PIPELINED); with it, after a few switch intervals.
        assert answered_before_other < PIPELINED // 2, answered_before_other
    finally:
        if reader is not None:
            reader.kill()
        busy.close()
        other.close()
