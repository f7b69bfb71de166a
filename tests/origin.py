"""A counting HTTP origin for tests: ``python -m tests.origin --port N``.

Standard library only, one thread per connection. Every GET (other than the control endpoints)
is counted by path, and its query string decides the answer:

``delay``   seconds (float) to sleep before answering
``status``  status code (default 200)
``body``    response text (default: JSON ``{"path", "params", "n"}``, n = count for this path)
``ctype``   content type (default application/json; text/plain with ``size``)
``size``    answer this many bytes of ``x`` instead of a body
``trickle`` seconds (float) between the body's bytes, sent one at a time (a slow origin
            that answers at once and never finishes in time)

Control endpoints (not counted): ``GET /__count`` -> ``{"total": N, "paths": {path: n}}`` and
``POST /__reset`` which zeroes the counts. Every answer carries Content-Length and an
``X-Origin-Count`` header (the count for the path, 0 for control endpoints).

Request logging is off unless ``ORIGIN_VERBOSE`` is set (then it goes to stderr). SIGTERM and
SIGINT shut the server down cleanly with exit code 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import types
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERBOSE = bool(os.environ.get("ORIGIN_VERBOSE"))


class RequestCounter:
    """Thread-safe request counts by path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def hit(self, path: str) -> int:
        """Count one request for ``path``; return the new count for that path."""
        with self._lock:
            self._counts[path] += 1
            return self._counts[path]

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"total": sum(self._counts.values()), "paths": dict(self._counts)}

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


class OriginHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        self.counter = RequestCounter()
        super().__init__(address, OriginHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-answer (timeouts in the code under test) are expected.
        exc = sys.exc_info()[1]
        if VERBOSE or not isinstance(exc, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class BadRequest(Exception):
    pass


class OriginHandler(BaseHTTPRequestHandler):
    server: OriginHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, as a pooled client would use it
    server_version = "TestOrigin/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        if VERBOSE:
            sys.stderr.write(f"origin {self.address_string()} {format % args}\n")

    def _send(
        self, status: int, body: bytes, ctype: str, count: int = 0, head_only: bool = False,
        trickle: float = 0.0,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Origin-Count", str(count))
        self.end_headers()
        if not head_only and body and trickle > 0:
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(trickle)
        elif not head_only and body:
            self.wfile.write(body)

    def _send_json(self, status: int, doc: object) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def _discard_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path == "/__count":
            self._send_json(200, self.server.counter.snapshot())
            return
        if path == "/__reset":
            self._send_json(405, {"error": "use POST /__reset"})
            return
        n = self.server.counter.hit(path)
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        try:
            status, body, ctype = self._answer(path, params, n)
        except BadRequest as exc:
            self._send(400, f"{exc}\n".encode(), "text/plain; charset=utf-8", n)
            return
        # 1xx/204/304 answers have no body; the headers still say how long it is (0).
        if status < 200 or status in (204, 304):
            body = b""
        trickle = params.get("trickle")
        self._send(status, body, ctype, n, trickle=float(trickle) if trickle else 0.0)

    @staticmethod
    def _answer(path: str, params: dict[str, str], n: int) -> tuple[int, bytes, str]:
        try:
            delay = float(params.get("delay", "0"))
            status = int(params.get("status", "200"))
            size = int(params["size"]) if "size" in params else None
        except ValueError as exc:
            raise BadRequest(f"bad query parameter: {exc}") from None
        if not 100 <= status <= 999 or (size is not None and size < 0) or delay < 0:
            raise BadRequest("status must be 100..999; size and delay must be >= 0")
        if delay > 0:
            time.sleep(delay)
        if size is not None:
            return status, b"x" * size, params.get("ctype", "text/plain")
        if "body" in params:
            body = params["body"].encode()
        else:
            body = json.dumps({"path": path, "params": params, "n": n}).encode()
        return status, body, params.get("ctype", "application/json")

    def do_HEAD(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        n = 0 if path.startswith("/__") else self.server.counter.hit(path)
        self._send(200, b"", "application/json", n, head_only=True)

    def do_POST(self) -> None:
        self._discard_body()
        if urllib.parse.urlsplit(self.path).path == "/__reset":
            self.server.counter.reset()
            self._send_json(200, {"total": 0, "paths": {}})
        else:
            self._send_json(405, {"error": "only GET is served; POST is for /__reset"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.origin", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    server = OriginHTTPServer((args.host, args.port))

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        # shutdown() blocks until serve_forever() returns, so it cannot run in this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
