"""A raw WSGI app for tests about how gunicorn's workers take turns: every answer is the
worker's pid; ``/spin`` first keeps the worker's CPU busy for ``SPIN_SECONDS``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

SPIN_SECONDS = 0.01


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/spin":
        until = time.perf_counter() + SPIN_SECONDS
        while time.perf_counter() < until:   # CPU, not a sleep: the loop gets no turn
            pass
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
