"""What one access line costs in-process, in each of the run's formats.

``BufferedAccessLogger.access`` on the shipped format, through the buffer (its drain off,
its lines dropped every 1,000), in gunicorn's own plain format and in the run's JSON and
text formats (what ``make bench`` and systemd run: JSON). Prints the median of several
rounds, in µs per line::

    python -m bench.accessline
"""

from __future__ import annotations

import datetime
import io
import os
import runpy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gunicorn.config import Config

from service.gunicorn import accesslog
from service.observe import logs

CONF = Path(__file__).resolve().parents[1] / "deploy" / "gunicorn.conf.py"


def _logger(log_format: str | None) -> tuple[Any, Any]:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", "/nonexistent-swr-bench")
    settings = runpy.run_path(str(CONF))
    cfg = Config()
    cfg.set("worker_class", "gevent")
    cfg.set("accesslog", "-")
    cfg.set("access_log_format", settings["access_log_format"])
    saved = logs.use_for_gunicorn
    if log_format is None:
        accesslog.logs.use_for_gunicorn = lambda *args: None  # type: ignore[assignment]
    else:
        os.environ[logs.FORMAT_ENV] = log_format
    try:
        logger = accesslog.BufferedAccessLogger(cfg)
    finally:
        accesslog.logs.use_for_gunicorn = saved  # type: ignore[assignment]
        os.environ.pop(logs.FORMAT_ENV, None)
    [handler] = logger.access_log.handlers
    handler._pid = accesslog._process[0]   # no drain thread: lines are dropped below
    handler.stream = io.StringIO()
    return logger, handler


def _request() -> tuple[Any, Any, dict[str, Any], datetime.timedelta]:
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": "/raw", "PATH_INFO": "/raw",
               "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
               "HTTP_USER_AGENT": "wrk"}
    resp = SimpleNamespace(status="200 OK", sent=2, headers=[("Content-Type", "text/plain"),
                                                             ("Content-Length", "2")])
    req = SimpleNamespace(headers=[("HOST", "localhost"), ("USER-AGENT", "wrk")])
    return resp, req, environ, datetime.timedelta(microseconds=45)


def per_line(log_format: str | None, n: int = 20000) -> float:
    logger, handler = _logger(log_format)
    args = _request()
    access = logger.access
    began = time.perf_counter()
    for i in range(n):
        access(*args)
        if i % 200 == 199:
            handler._lines, handler._size = [], 0
    return (time.perf_counter() - began) / n


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    kinds: dict[str, str | None] = {"plain": None, "json": "json", "text": "text"}
    seen: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for name, fmt in kinds.items():   # interleaved: the host's noise hits all alike
            seen[name].append(per_line(fmt))
    for name, values in seen.items():
        print(f"{name:6} {statistics.median(values) * 1e6:5.2f} µs per line "
              f"(rounds {', '.join(f'{v * 1e6:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
