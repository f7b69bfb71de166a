"""The herd row of the hit bench: one hot ``/v1`` key under load while it expires and is
refreshed in the background (``python -m bench.throughput``, part of ``make bench``).

The server is ``bench.hits_app`` with ``BENCH_HERD_LOG`` set: the origin of ``/v1/herd``
takes ``HERD_ORIGIN_SECONDS`` and appends its wall-clock start and end to that file, so a
read can be told apart as *during a refresh* (it overlapped a fetch, in any worker) or
*hot* (it did not). ``bench/noise.py`` holds the controls this row is read against.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import load as loadgen
from .procs import LOOPBACK, Gunicorn

HERD_MAX_AGE = 4.0
HERD_ORIGIN_SECONDS = 3.0


def herd(server: Gunicorn, log: Path, connections: int, duration: float) -> dict[str, Any]:
    """One hot key under load while it expires and is refreshed in the background.

    Each fetch of the origin (any worker) appends its wall-clock start and end to ``log``.
    Reads sent before the first fill landed (everyone waits for a cold key) are left out;
    of the others, a read that overlapped a fetch is a read *during a refresh*, the rest
    are hot reads. The target: no read during a refresh slower than 2x the hot reads' p99.
    """
    log.write_text("", encoding="ascii")
    load = loadgen.run(LOOPBACK, server.port, "/v1/herd", connections, duration, timeout=30)
    time.sleep(HERD_ORIGIN_SECONDS + 0.5)    # a refresh started at the end lands in the log
    fetches = [tuple(float(x) for x in line.split())
               for line in log.read_text(encoding="ascii").splitlines() if line.strip()]
    fetches = [f for f in fetches if f[0] < load.started_at + load.wall]
    ok = [x for x in load.samples if x.status == 200]
    first_fill = min((x.end for x in ok), default=float("inf"))
    after = [x for x in ok if x.start >= first_fill]
    spans = [(a - load.started_at, b - load.started_at) for a, b in fetches]
    overlaps = [any(x.start < b and x.end > a for a, b in spans) for x in after]
    during = [x for x, o in zip(after, overlaps, strict=True) if o]
    hot = sorted(x.latency for x, o in zip(after, overlaps, strict=True) if not o)
    p99 = hot[int(0.99 * (len(hot) - 1))] if hot else float("nan")
    slow_reads = sorted(x.latency for x in during)
    during_p99 = (slow_reads[int(0.99 * (len(slow_reads) - 1))] if slow_reads
                  else float("nan"))
    slowest = max((x.latency for x in during), default=float("nan"))
    windows = load.wall / HERD_MAX_AGE
    served = server_times(server.log_path, "/v1/herd")
    return {"duration": load.wall, "connections": connections, "requests": len(load.samples),
            "errors": len(load.samples) - len(ok), "fetches": len(fetches),
            "windows": windows, "per_window": len(fetches) / windows,
            "first_fill": first_fill, "reads_during": len(during), "hot_reads": len(hot),
            "hot_p99": p99, "slowest_during": slowest, "during_p99": during_p99,
            "hot_max": hot[-1] if hot else float("nan"),
            # How often a read is over the target's bound, during refreshes and outside
            # them: a refresh that slowed reads would show here as a higher share.
            "over_during": _share_over(slow_reads, 2 * p99),
            "over_hot": _share_over(hot, 2 * p99),
            "server_reads": len(served),
            "server_p99": served[int(0.99 * (len(served) - 1))] if served else float("nan"),
            "server_max": served[-1] if served else float("nan"),
            "ratio": slowest / p99,
            "x_cache": dict(Counter(x.x_cache for x in load.samples)),
            "misses_after_fill": sum(1 for x in after if x.x_cache == "MISS")}


def _share_over(latencies: Sequence[float], bound: float) -> float:
    return sum(1 for x in latencies if x > bound) / len(latencies) if latencies else float("nan")


def server_times(log: Path, path: str) -> list[float]:
    """The request times gunicorn logged (``time=`` of the shipped access-log format) for
    the non-MISS reads of ``path``, sorted: how long the server itself took, from the
    parsed request to the last byte written, without the queueing before it."""
    pattern = re.compile(r'"GET ' + re.escape(path) + r' .*x_cache=(\S+) time=([\d.]+)')
    times = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = pattern.search(line)
        if m and m.group(1) != "MISS":
            times.append(float(m.group(2)))
    return sorted(times)



def herd_line(h: dict[str, Any]) -> str:
    return (f"herd: one hot key, {HERD_ORIGIN_SECONDS:g} s origin, {HERD_MAX_AGE:g} s windows, "
            f"{h['connections']} connections for {h['duration']:.1f} s: {h['fetches']} origin "
            f"fetch(es) in {h['windows']:.1f} windows ({h['per_window']:.2f} per window); "
            f"slowest of {h['reads_during']:,} reads during refreshes "
            f"{h['slowest_during'] * 1000:,.0f} ms vs hot-read p99 {h['hot_p99'] * 1000:,.1f} ms "
            f"({h['hot_reads']:,} reads): {h['ratio']:.1f}x (target <= 2x); p99 during refreshes "
            f"{h['during_p99'] * 1000:,.1f} ms; slowest hot read "
            f"{h['hot_max'] * 1000:,.0f} ms; reads over 2x the hot p99: "
            f"{h['over_during']:.2%} of those during refreshes, {h['over_hot']:.2%} of the "
            f"hot ones; the server's own time for "
            f"the {h['server_reads']:,} non-MISS reads (access log, queueing "
            f"excluded): p99 {h['server_p99'] * 1000:,.1f} ms, max "
            f"{h['server_max'] * 1000:,.0f} ms; MISS after the first "
            f"fill {h['misses_after_fill']}, errors {h['errors']}, X-Cache {h['x_cache']}")

