"""The machine's own noise, measured in the same run as the herd it explains.

Two controls for the herd's target ("during refreshes no read slower than 2x the
hot-read p99"), each answering one question with the service out of the picture:

* :func:`cpu_stalls`: does this machine take the CPU away from a process that has nothing
  to wait for? A lone busy loop, in a process of its own while nothing else of the bench
  runs, counts the work it gets done in each 10 ms of wall time; a stretch of windows
  with under 30% of the median work is a stall it could do nothing about. On a VM whose
  host shares its cores, a loop loses its CPU for tens of milliseconds at a time while
  the guest's steal counter barely moves.
* :func:`control_tail`: how slow is the slowest read when nothing is ever refreshed? The
  herd's load (the same closed-loop client, connections and duration) on the raw WSGI
  app, which answers constant bytes: its slowest read against its own p99 is the ratio
  any server would show here.

``python -m bench.noise [SECONDS]`` runs the first alone and prints it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import load as loadgen
from .procs import LOOPBACK, REPO_ROOT

WINDOW = 0.010     # seconds of wall time per window
SLOW_SHARE = 0.3   # a window with under this share of the median work is a stall


def slow_stretches(counts: Sequence[int], share: float = SLOW_SHARE) -> list[int]:
    """The lengths, in windows, of the runs of consecutive windows whose work is under
    ``share`` of the median window's, longest last."""
    if not counts:
        return []
    bound = share * statistics.median(counts)
    runs, current = [], 0
    for n in counts:
        if n < bound:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return sorted(runs)


def _busy_loop(seconds: float) -> list[int]:
    """Units of work done in each ``WINDOW`` of wall time (a unit is a few µs of Python)."""
    counts = [0] * int(seconds / WINDOW)
    start = time.perf_counter()
    while True:
        total = 0
        for i in range(100):  # the unit of work: small, so a window holds hundreds
            total += i
        window = int((time.perf_counter() - start) / WINDOW)
        if window >= len(counts):
            return counts
        counts[window] += 1


def _steal_ticks() -> int:
    """The guest's steal counter (``/proc/stat``), in clock ticks; 0 where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0
    return int(fields[8]) if len(fields) > 8 else 0


def cpu_stalls(seconds: float) -> dict[str, Any]:
    """Run the busy loop in a child process for ``seconds``; its stalls, summarised."""
    out = subprocess.run([sys.executable, "-m", "bench.noise", "--raw", f"{seconds:g}"],
                         capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout
    return summarise(json.loads(out))


def summarise(probe: dict[str, Any]) -> dict[str, Any]:
    counts: list[int] = probe["counts"]
    runs = slow_stretches(counts)
    median = statistics.median(counts) if counts else 0
    return {"seconds": len(counts) * WINDOW, "median_units": median,
            "stalled_windows": sum(runs), "windows": len(counts),
            "stalls": len(runs), "longest_ms": runs[-1] * WINDOW * 1000 if runs else 0.0,
            "longest_five_ms": [r * WINDOW * 1000 for r in runs[-5:]],
            "steal_ms": probe["steal_ticks"] * 1000 / probe["ticks_per_second"]}


def stalls_line(s: dict[str, Any]) -> str:
    return (f"a lone busy loop, nothing else of the bench running, for {s['seconds']:g} s: "
            f"{s['stalls']} stall(s) (runs of 10 ms windows with under "
            f"{SLOW_SHARE:.0%} of its median work), {s['stalled_windows']} of "
            f"{s['windows']:,} windows, the longest {s['longest_ms']:.0f} ms (five longest: "
            + ", ".join(f"{x:.0f}" for x in s["longest_five_ms"])
            + f" ms); the guest's steal counter over the same time: {s['steal_ms']:.0f} ms")


def control_tail(port: int, path: str, connections: int, duration: float) -> dict[str, Any]:
    """The herd's load on ``path`` (meant for the raw WSGI app): the slowest read against
    the p99, with the same rule for what counts (reads sent after the first answer)."""
    load = loadgen.run(LOOPBACK, port, path, connections, duration, timeout=30)
    ok = [x for x in load.samples if x.status == 200]
    first = min((x.end for x in ok), default=float("inf"))
    latencies = sorted(x.latency for x in ok if x.start >= first)
    if not latencies:
        return {"path": path, "reads": 0, "errors": len(load.samples), "p99": float("nan"),
                "max": float("nan"), "ratio": float("nan"), "over": float("nan")}
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    return {"path": path, "reads": len(latencies), "errors": len(load.samples) - len(ok),
            "p99": p99, "max": latencies[-1], "ratio": latencies[-1] / p99,
            "over": sum(1 for x in latencies if x > 2 * p99) / len(latencies)}


def control_line(c: dict[str, Any]) -> str:
    return (f"the same load on the raw WSGI app (`{c['path']}`: no cache, nothing ever "
            f"refreshed): slowest of {c['reads']:,} reads {c['max'] * 1000:,.0f} ms vs its "
            f"p99 {c['p99'] * 1000:,.1f} ms: {c['ratio']:.1f}x; reads over 2x its p99: "
            f"{c['over']:.2%}; errors {c['errors']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    raw = bool(args) and args[0] == "--raw"
    seconds = float(args[1 if raw else 0]) if len(args) > (1 if raw else 0) else 10.0
    steal = _steal_ticks()
    counts = _busy_loop(seconds)
    probe = {"counts": counts, "steal_ticks": _steal_ticks() - steal,
             "ticks_per_second": os.sysconf("SC_CLK_TCK")}
    print(json.dumps(probe) if raw else stalls_line(summarise(probe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
