"""The herd bench: ``python -m bench`` (``make bench``).

Starts its own memcached and ``gunicorn -c deploy/gunicorn.conf.py bench.herd_app:app``,
then loads ``/plain`` (Flask-Caching ``@cached``) and ``/swr`` (``@swr.cached``) in turn,
each with N concurrent keep-alive connections for D seconds, and prints, side by side:
how many times the slow view ran (origin fetches) per TTL window, and how long readers
waited, in particular the slowest read made after the key had first been filled (the
herd: readers stuck behind a recompute once the entry expired). A third run on the
uncached ``/healthz`` shows the machine's noise floor under the same load.

Every process it starts is stopped at the end, also on Ctrl-C, SIGTERM or an error.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent

from . import load as loadgen
from .procs import LOOPBACK, REPO_ROOT, Gunicorn, Memcached, http_get

ROUTES = {"plain": "/plain", "swr": "/swr", "baseline": "/healthz"}
TITLES = {"plain": "plain @cached", "swr": "@swr.cached", "baseline": "no cache"}


def _env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Herd bench: origin fetches per TTL window and the slowest read during "
                    "refreshes, plain Flask-Caching @cached vs @swr.cached, same memcached.")
    p.add_argument("--duration", type=float, default=_env("BENCH_DURATION", 14.0),
                   help="seconds of load per scenario (env BENCH_DURATION; default 14)")
    p.add_argument("--view-seconds", type=float, default=_env("BENCH_VIEW_SECONDS", 3.0),
                   help="how long the slow view waits, gevent.sleep (default 3)")
    p.add_argument("--ttl", type=float, default=_env("BENCH_TTL", 5.0),
                   help="@cached timeout and @swr.cached max_age (default 5)")
    p.add_argument("--connections", type=int, default=int(_env("BENCH_CONNECTIONS", 32)),
                   help="concurrent keep-alive connections (default 32)")
    p.add_argument("--workers", type=int, default=int(_env("BENCH_WORKERS", 4)),
                   help="gunicorn gevent workers (default 4)")
    p.add_argument("--only", choices=sorted(ROUTES), action="append",
                   help="run only this scenario (repeatable); default: all three")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the uncached /healthz run that shows the machine's noise floor")
    p.add_argument("--metrics", action="store_true",
                   help="also report lease and memcached-error counts from /metrics "
                        "(sets PROMETHEUS_MULTIPROC_DIR, which slows the workers down)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the temporary directory (gunicorn and memcached logs, settings)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when @swr.cached shows a herd (> 1.25 fetches per window, "
                        "or a read sent after the first fill answered MISS) or errors")
    args = p.parse_args(argv)
    for name in ("duration", "view_seconds", "ttl"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.connections < 1 or args.workers < 1:
        p.error("--connections and --workers must be >= 1")
    return args


# -- metrics (prometheus text format, merged over the workers) ----------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base_url: str) -> Metrics | None:
    try:
        status, body = http_get(base_url + "/metrics", timeout=5.0)
    except OSError:
        return None
    if status != 200:
        return None
    found: Metrics = {}
    for line in body.decode("utf-8", "replace").splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        try:
            found[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return found


def total(metrics: Metrics | None, name: str, **labels: str) -> float | None:
    if metrics is None:
        return None
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)


def delta(before: Metrics | None, after: Metrics | None, name: str, **labels: str
          ) -> float | None:
    a, b = total(after, name, **labels), total(before, name, **labels)
    return None if a is None or b is None else a - b


# -- one scenario ----------------------------------------------------------------------

@dataclass
class Result:
    key: str
    load: loadgen.Load
    fetches: int
    ttl: float
    view_seconds: float
    starts: list[float] = field(default_factory=list)  # s after the load started
    metrics: dict[str, float | None] = field(default_factory=dict)

    @property
    def ok(self) -> list[loadgen.Sample]:
        return [s for s in self.load.samples if s.status == 200]

    @property
    def errors(self) -> int:
        return sum(1 for s in self.load.samples if s.status != 200)

    @property
    def windows(self) -> float:
        return self.load.duration / self.ttl

    @property
    def per_window(self) -> float:
        return self.fetches / self.windows

    @property
    def first_fill(self) -> float | None:
        """When the first answer landed: from then on the key had been filled once."""
        ends = [s.end for s in self.ok]
        return min(ends) if ends else None

    @property
    def after_fill(self) -> list[loadgen.Sample]:
        fill = self.first_fill
        return [] if fill is None else [s for s in self.load.samples if s.start >= fill]

    def latency(self, q: float) -> float | None:
        values = sorted(s.latency for s in self.load.samples)
        if not values:
            return None
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    @property
    def slowest_after_fill(self) -> float | None:
        after = self.after_fill
        return max(s.latency for s in after) if after else None

    def x_cache(self) -> str:
        seen = Counter(s.x_cache for s in self.ok)
        return f"{seen['HIT']}/{seen['STALE']}/{seen['MISS']}"

    @property
    def missed_after_fill(self) -> int:
        """Reads sent after the first fill that were answered MISS: they waited for a
        fetch. Exact, unlike latencies, but only @swr.cached sends X-Cache."""
        return sum(1 for s in self.after_fill if s.x_cache == "MISS")

    @property
    def waited_after_fill(self) -> int:
        return sum(1 for s in self.after_fill if s.latency >= self.view_seconds / 2)


def counts(base_url: str) -> dict[str, Any]:
    """The herd app's ``/count``: both counters and when each recompute started."""
    status, body = http_get(base_url + "/count?starts=1", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"/count answered {status}: {body[:200]!r}")
    doc: dict[str, Any] = json.loads(body)
    return doc


def bursts(starts: list[float], gap: float = 0.5) -> str:
    """``0.0x32, 8.1x32``: recompute start times, those less than ``gap`` apart merged."""
    groups: list[list[float]] = []
    for t in sorted(starts):
        if groups and t - groups[-1][-1] < gap:
            groups[-1].append(t)
        else:
            groups.append([t])
    return ", ".join(f"{g[0]:.1f}" + (f"x{len(g)}" if len(g) > 1 else "") for g in groups)


def run_scenario(server: Gunicorn, key: str, args: argparse.Namespace) -> Result:
    before_counts = counts(server.url)
    before_metrics = scrape(server.url) if args.metrics else None
    load = loadgen.run(LOOPBACK, server.port, ROUTES[key], args.connections, args.duration)
    # Every request has finished; a background refresh may still run, but it was
    # counted when it started. Deltas make the scenarios independent of each other.
    after_counts = counts(server.url)
    after_metrics = scrape(server.url) if args.metrics else None
    first, last = int(before_counts.get(key, 0)), int(after_counts.get(key, 0))
    result = Result(key, load, last - first, args.ttl, args.view_seconds)
    started = after_counts.get(f"{key}_starts", {})
    result.starts = [started[str(i)][0] - load.started_at
                     for i in range(first + 1, last + 1) if str(i) in started]
    result.metrics = {
        "memcached_errors": delta(before_metrics, after_metrics, "memcached_errors_total"),
        "lease_acquired": delta(before_metrics, after_metrics, "cache_lease_total",
                                outcome="acquired"),
        "lease_contended": delta(before_metrics, after_metrics, "cache_lease_total",
                                 outcome="contended"),
    }
    return result


# -- report ----------------------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.3f}"


def report(results: dict[str, Result], args: argparse.Namespace,
           events: Counter[str] | None = None) -> list[str]:
    """Print the table; return the findings about @swr.cached (empty: none)."""
    caches = [results[k] for k in ("plain", "swr") if k in results]
    baseline = results.get("baseline")
    both = len(caches) == 2
    Cell = Callable[[Result], str]
    Metric = Callable[[Result], float | None]
    rows: list[tuple[str, Cell, Metric | None, bool]] = []

    def row(label: str, cell: Cell, ratio: Metric | None = None,
            baseline_too: bool = True) -> None:
        rows.append((label, cell, ratio, baseline_too))

    row("requests done", lambda x: f"{len(x.load.samples):,}")
    row("errors (status != 200)", lambda x: f"{x.errors:,}")
    row("requests/s", lambda x: f"{len(x.load.samples) / x.load.wall:,.0f}")
    row("origin fetches (view runs)", lambda x: str(x.fetches), lambda x: x.fetches, False)
    row("TTL windows elapsed (duration/TTL)", lambda x: f"{x.windows:.1f}", None, False)
    row("fetches per window", lambda x: f"{x.per_window:.2f}", lambda x: x.per_window, False)
    row("first fill landed at (s)", lambda x: _num(x.first_fill, "{:.2f}"), None, False)
    row("latency p50 (ms)", lambda x: _ms(x.latency(0.50)))
    row("latency p99 (ms)", lambda x: _ms(x.latency(0.99)))
    row("latency max, cold start incl. (ms)", lambda x: _ms(x.latency(1.0)))
    row("slowest read after first fill (ms)", lambda x: _ms(x.slowest_after_fill),
        lambda x: x.slowest_after_fill)
    row(f"reads after fill waiting >= {args.view_seconds / 2:g} s",
        lambda x: f"{x.waited_after_fill:,}")
    row("X-Cache HIT/STALE/MISS", lambda x: x.x_cache() if x.key == "swr" else "-", None, False)
    row("MISS answers after first fill", lambda x: f"{x.missed_after_fill:,}"
        if x.key == "swr" else "-", None, False)
    if args.metrics:
        row("memcached errors (server metrics)", lambda x: _num(x.metrics["memcached_errors"]))
        row("SWR leases acquired/contended", lambda x: "-" if x.key != "swr" else
            f"{_num(x.metrics['lease_acquired'])}/{_num(x.metrics['lease_contended'])}",
            None, False)

    titles = [TITLES[x.key] for x in caches] + (["swr/plain"] if both else []) + (
        [TITLES["baseline"]] if baseline else [])
    width = max(len(label) for label, *_ in rows) + 2
    header = f"{'':<{width}}" + "".join(f"{t:>16}" for t in titles)
    print()
    print(header)
    print("-" * len(header))
    for label, cell, ratio, baseline_too in rows:
        values = [cell(x) for x in caches]
        if both:
            values.append(_ratio(ratio(results["swr"]), ratio(results["plain"]))
                          if ratio else "")
        if baseline:
            values.append(cell(baseline) if baseline_too else "-")
        print(f"{label:<{width}}" + "".join(f"{v:>16}" for v in values))
    print()

    for x in caches:
        slowest = x.slowest_after_fill
        print(f"{TITLES[x.key]}: the view ran {x.fetches} times in {x.load.duration:g} s "
              f"({x.per_window:.2f} per {args.ttl:g} s window); slowest read after the "
              f"first fill: {_ms(slowest)} ms"
              + ("" if slowest is None else f" ({slowest / args.view_seconds:.0%} of the "
                 f"{args.view_seconds:g} s view)"))
        print(f"  recomputes started at (s into the load; xN: N within 0.5 s): "
              f"{bursts(x.starts) or '-'}")
    if baseline:
        print(f"{TITLES['baseline']} ({ROUTES['baseline']}, no cache, no I/O): slowest read "
              f"{_ms(baseline.latency(1.0))} ms: this machine's noise floor at this load")
    for x in results.values():
        for err in x.load.errors[:3]:
            print(f"  client error on {ROUTES[x.key]}: {err}")
    if both:
        print(f"ratios swr/plain: origin fetches "
              f"{_ratio(results['swr'].fetches, results['plain'].fetches)}, "
              f"slowest read after first fill "
              f"{_ratio(results['swr'].slowest_after_fill, results['plain'].slowest_after_fill)}")

    findings: list[str] = []
    notes: list[str] = []
    swr = results.get("swr")
    if swr is not None:
        if swr.per_window > 1.25:
            findings.append(f"@swr.cached recomputed {swr.per_window:.2f} times per window "
                            f"({swr.fetches} in {swr.load.duration:g} s): more than one")
        if swr.missed_after_fill:
            findings.append(f"@swr.cached answered {swr.missed_after_fill} read(s) sent after "
                            f"the first fill with MISS: they waited for a fetch")
        if swr.waited_after_fill and not swr.missed_after_fill:
            # Latency alone is noisy: a saturated worker stalls uncached /healthz too.
            notes.append(
                f"{swr.waited_after_fill} @swr.cached read(s) after the first fill took "
                f">= {args.view_seconds / 2:g} s (slowest {_ms(swr.slowest_after_fill)} ms), "
                f"but none was a MISS, so none waited for a fetch: CPU contention"
                + (f" (uncached /healthz: slowest {_ms(baseline.latency(1.0))} ms)"
                   if baseline else ""))
        if swr.errors:
            findings.append(f"@swr.cached answered {swr.errors} request(s) with an error")
        fenced = (events or Counter())["fenced"]
        if fenced:
            # Only @swr.cached writes through the lease: a fenced write means two workers
            # fetched the same key at once, each believing it held the lease.
            findings.append(f"{fenced} fenced write(s) in the workers' log: a refresh ran "
                            f"while another worker's refresh of the same key was running")
    for note in notes:
        print(f"note: {note}")
    for finding in findings:
        print(f"FINDING: {finding}")
    return findings


# -- main ------------------------------------------------------------------------------

class Stopped(KeyboardInterrupt):
    """SIGTERM: unwind like Ctrl-C, so the same cleanup runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Stopped(f"signal {signum}")


def log_summary(path: Path, show: int = 5) -> tuple[list[str], Counter[str]]:
    """What the workers logged: their service events (JSON lines) by name, and how many
    warnings and errors, with the commonest ones. Returns the lines to print and the
    event counts."""
    events: Counter[str] = Counter()
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return [], events
    bad = []
    for line in lines:
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                doc = {}
            if "event" not in doc:
                continue
            name = str(doc["event"])
            if "leased" in doc:
                name += " (leased)" if doc["leased"] else " (WITHOUT lease)"
            events[name] += 1
            if doc.get("level") in ("warning", "error", "critical"):
                bad.append(f"{doc.get('level')} {doc.get('event', '')}: {doc.get('msg', '')}")
        elif re.search(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b", line):
            bad.append(line)
    out = []
    if events:
        out.append("service log events (whole run): " + ", ".join(
            f"{name} x{n}" for name, n in sorted(events.items())))
    if not bad:
        return [*out, "gunicorn log: no warnings or errors"], events
    # Strip timestamps and pids so repeats of one message are counted together.
    shapes = Counter(re.sub(r"\d+(\.\d+)?", "N", line)[:160] for line in bad)
    return [*out, f"gunicorn log: {len(bad)} warning/error line(s); commonest:"] + [
        f"  {n:>5} x {shape}" for shape, n in shapes.most_common(show)], events


def revision() -> str:
    """The code under test: the commit, and whether service/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "service at an unknown revision"
    changes = " + uncommitted changes" if dirty.stdout.strip() else ""
    return f"service at {head.stdout.strip()}{changes}"


def write_settings(path: Path, memcached: Memcached) -> None:
    path.write_text(
        "# Written by python -m bench: its own memcached, nothing else shared.\n"
        "[cache]\n"
        f'servers = ["{memcached.address}"]\n'
        'key_prefix = "bench"\n'
        "pool_size = 64\n",
        encoding="utf-8",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keys = [k for k in ROUTES if (k in args.only if args.only else
                                  k != "baseline" or not args.no_baseline)]
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C during the load lands in gevent's hub, which hands it to us; no traceback.
    hub = gevent.get_hub()
    hub.NOT_ERROR = (*hub.NOT_ERROR, KeyboardInterrupt)
    began = time.monotonic()
    print(f"herd bench: {args.workers} gunicorn gevent workers, {args.connections} "
          f"connections, {args.duration:g} s per scenario, view {args.view_seconds:g} s "
          f"(gevent.sleep), TTL {args.ttl:g} s; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; {revision()}", flush=True)
    results: dict[str, Result] = {}
    memcached: Memcached | None = None
    server: Gunicorn | None = None
    workdir = Path(tempfile.mkdtemp(prefix="swr-bench-"))
    try:
        try:
            # Assigned before start(): a start that fails or is interrupted half-way
            # still leaves a process for the finally-block to stop.
            memcached = Memcached(workdir)
            memcached.start()
            settings = workdir / "settings.toml"
            write_settings(settings, memcached)
            server = Gunicorn(workdir, settings, args.workers, {
                "BENCH_VIEW_SECONDS": repr(args.view_seconds),
                "BENCH_TTL": repr(args.ttl),
            }, metrics=args.metrics)
            server.start()
            time.sleep(0.5)  # let the last forked workers finish loading the app
            print(f"memcached {memcached.address}, gunicorn {server.url} "
                  f"(started in {time.monotonic() - began:.1f} s)", flush=True)
            for key in keys:
                print(f"... {TITLES[key]} on {ROUTES[key]}: {args.connections} connections "
                      f"for {args.duration:g} s", flush=True)
                results[key] = run_scenario(server, key, args)
                server.check_alive()
        except KeyboardInterrupt as exc:
            print("\ninterrupted; stopping gunicorn and memcached", file=sys.stderr)
            return 128 + (signal.SIGTERM if isinstance(exc, Stopped) else signal.SIGINT)
        except Exception as exc:
            print(f"\nbench failed: {exc}", file=sys.stderr)
            return 2
        finally:
            # Cleanup is bounded (about 20 s at worst); a second Ctrl-C must not cut it short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if server is not None:
                server.stop(timeout=15.0)
            if memcached is not None:
                memcached.stop()
        log_lines, events = log_summary(workdir / "gunicorn.log")
    finally:
        if args.keep_logs:
            print(f"logs and settings kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    findings = report(results, args, events)
    print("\n".join(log_lines))
    print(f"\ntotal run time {time.monotonic() - began:.1f} s")
    return 1 if findings and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
