"""The hit bench: ``python -m bench.throughput`` (part of ``make bench``).

One gunicorn (``deploy/gunicorn.conf.py``, the shipped config: gevent, Prometheus
multiprocess mode, the access log) serving ``bench.hits_app``, its own memcached, and wrk.
In one run, so every ratio compares numbers measured minutes apart on the same machine:

1. hits at 32 connections, every route in turn, ``--rounds`` interleaved rounds, medians,
   as ratios of the raw WSGI row (the issue's table; its "access log to /dev/null" row on
   a second server started with ``--access-logfile /dev/null``);
2. 1,000 connections on a hot key (raw WSGI and ``/v1`` hit, interleaved): requests/s,
   p99 and timeouts (wrk ``--timeout 5s``);
3. a cold key read by 300 simultaneous readers (origin 1 s): how many origin fetches, how
   long the readers waited, the slowest of them;
4. the herd: one hot ``/v1`` key, a 3 s origin, 4 s windows (``stale_while_revalidate``
   60 s), 32 closed-loop connections: origin fetches per window, and the slowest read
   that overlapped a refresh against the p99 of the hot reads that did not
   (``bench/refreshes.py``), then its two controls (``bench/noise.py``): the same load on
   the raw WSGI app, and a lone busy loop that shows how long the machine takes the CPU
   away from a process with nothing to wait for.

It prints the table and writes ``docs/BENCHMARKS.md`` (with ``bench/memory.py``'s RSS
figures, a PNG plot and the profile of a hot hit from ``bench/profile_hit.py`` when they
are given). ``--quick`` shortens everything for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent

from . import load as loadgen
from . import noise
from .procs import LOOPBACK, REPO_ROOT, Gunicorn, Memcached, http_get
from .refreshes import HERD_MAX_AGE, HERD_ORIGIN_SECONDS, herd, herd_line

# A route whose key ends so is measured on a second server, the same but for its access
# log (``--access-logfile /dev/null``): the row of what the log costs.
DEVNULL = " (log to /dev/null)"
ROUTES = [
    ("raw WSGI app, constant bytes", "/raw"),
    ("bare Flask view", "/flask"),
    ("Flask-Caching @cached hit (memcached)", "/fc"),
    ("our /v1/NAME hit", "/v1/const"),
    ("our /v1/NAME hit, access log to /dev/null", "/v1/const" + DEVNULL),
    ("our @swr.cached hit", "/swr"),
]


@dataclass
class Wrk:
    rps: float
    p99: float          # seconds
    timeouts: int
    errors: int
    requests: int


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk(url: str, connections: int, seconds: float, timeout: float = 5.0) -> Wrk:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout:g}s",
         "--latency", url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = re.search(r"(\d+) requests in", out)
    errors = sum(int(g) for g in socket.groups()[:3]) if socket else 0
    return Wrk(rps, _seconds(p99.group(1)) if p99 else float("nan"),
               int(socket.group(4)) if socket else 0,
               errors + (int(non2xx.group(1)) if non2xx else 0),
               int(done.group(1)) if done else 0)


def write_settings(path: Path, memcached: Memcached) -> None:
    path.write_text(
        "# Written by python -m bench.throughput.\n"
        "[cache]\n"
        f'servers = ["{memcached.address}"]\n'
        'key_prefix = "hits"\n'
        "pool_size = 64\n"
        "[refresh]\nfetch_timeout = 10\n"
        '[sources.const]\nkind = "python"\ntarget = "bench.hits_app:const"\n'
        "max_age = 3600\n"
        '[sources.slow]\nkind = "python"\ntarget = "bench.hits_app:slow"\n'
        "max_age = 3600\n"
        '[sources.herd]\nkind = "python"\ntarget = "bench.hits_app:herd"\n'
        f"max_age = {HERD_MAX_AGE:g}\nstale_while_revalidate = 60\n", encoding="utf-8")


# The 1,000-connection row is also measured, interleaved, on servers started with these
# gunicorn arguments on top of deploy/gunicorn.conf.py (docs/BENCHMARKS.md says why).
HIGH_VARIANTS = ("--reuse-port", "--reuse-port --worker-connections=250")


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cold_key(server: Gunicorn, readers: int = 300) -> dict[str, object]:
    """``readers`` simultaneous GETs of one cold key; origin fetches from ``/metrics``."""
    path = f"/v1/slow?id=cold{time.time_ns()}"
    request = loadgen._Connection  # the bench's small HTTP client (one request each)
    before = metric(http_get(server.url + "/metrics")[1].decode(), "cache_refreshes_total",
                    source="slow", outcome="ok")
    results: list[tuple[float, int, str]] = []

    def reader() -> None:
        conn = request(LOOPBACK, server.port, (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode(), 30.0)
        t0 = time.monotonic()
        try:
            status, x_cache = conn.get()
        except (OSError, ValueError):
            status, x_cache = 0, ""
        finally:
            conn.close()
        results.append((time.monotonic() - t0, status, x_cache))

    gevent.joinall([gevent.spawn(reader) for _ in range(readers)])
    time.sleep(1.5)  # every worker flushes its metrics within a second
    after = metric(http_get(server.url + "/metrics")[1].decode(), "cache_refreshes_total",
                   source="slow", outcome="ok")
    waits = sorted(r[0] for r in results)
    return {"readers": readers, "fetches": after - before,
            "ok": sum(1 for r in results if r[1] == 200),
            "x_cache": dict(Counter(r[2] for r in results)),
            "p50": waits[len(waits) // 2], "max": waits[-1]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="per route per round")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--high", type=int, default=1000, help="connections of the high row")
    p.add_argument("--high-seconds", type=float, default=10.0)
    p.add_argument("--high-variant", action="append", default=None, metavar="ARGS",
                   help="gunicorn arguments of another server (GUNICORN_CMD_ARGS) whose "
                   "high row is interleaved with the shipped config's; repeatable "
                   f"(default: {' and '.join(repr(v) for v in HIGH_VARIANTS)}; '' for none)")
    p.add_argument("--herd-seconds", type=float, default=20.0)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.high_variant is None:
        args.high_variant = list(HIGH_VARIANTS)
    args.high_variant = [v for v in args.high_variant if v]
    if args.quick:
        args.rounds, args.seconds, args.high_seconds, args.herd_seconds = 1, 2.0, 4.0, 12.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (sudo apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="swr-hits-"))
    memcached = Memcached(workdir)
    server: Gunicorn | None = None
    variants: dict[str, Gunicorn] = {}
    began = time.monotonic()
    load_average = os.getloadavg()[0]
    try:
        memcached.start()
        settings = workdir / "settings.toml"
        write_settings(settings, memcached)
        herd_log = workdir / "herd.log"
        server = Gunicorn(workdir, settings, args.workers,
                          {"BENCH_HERD_LOG": str(herd_log),
                           "BENCH_HERD_SECONDS": f"{HERD_ORIGIN_SECONDS:g}"},
                          metrics=True, app="bench.hits_app:app")
        server.start()
        (workdir / "devnull").mkdir()
        quiet = Gunicorn(workdir / "devnull", settings, args.workers,
                         {"GUNICORN_CMD_ARGS": "--access-logfile /dev/null"}, metrics=True,
                         app="bench.hits_app:app")
        variants["--access-logfile /dev/null"] = quiet.start()

        def url(key: str) -> str:
            if key.endswith(DEVNULL):
                return quiet.url + key.removesuffix(DEVNULL)
            assert server is not None
            return server.url + key

        for i, extra in enumerate(args.high_variant):
            vdir = workdir / f"variant{i}"
            vdir.mkdir()
            variants[extra] = Gunicorn(vdir, settings, args.workers,
                                       {"GUNICORN_CMD_ARGS": extra}, metrics=True,
                                       app="bench.hits_app:app").start()
        time.sleep(0.5)
        for variant in variants.values():
            for _ in range(4 * args.workers):
                http_get(variant.url + "/v1/const")
        for _, path in ROUTES:  # fill every cache, in every worker
            for _ in range(4 * args.workers):
                http_get(url(path))
        print(f"hit bench: {args.workers} gunicorn gevent workers (deploy/gunicorn.conf.py), "
              f"wrk {args.connections} connections, {args.rounds} interleaved round(s) of "
              f"{args.seconds:g} s per route; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        runs: dict[str, list[Wrk]] = {path: [] for _, path in ROUTES}
        for r in range(args.rounds):
            # Each round starts one route later: a run right after another one on the same
            # server does a little worse (its connections still closing), and a fixed order
            # would always hand that to the same route.
            for _, path in ROUTES[r % len(ROUTES):] + ROUTES[:r % len(ROUTES)]:
                runs[path].append(wrk(url(path), args.connections, args.seconds))
            print(f"... round {r + 1}: " + ", ".join(
                f"{p} {runs[p][-1].rps:,.0f}/s" for _, p in ROUTES), flush=True)
        variants.pop("--access-logfile /dev/null").stop(timeout=15.0)
        configs = {"shipped": server, **variants}
        high: dict[tuple[str, str], list[Wrk]] = {
            (c, p): [] for c in configs for p in ("/raw", "/v1/const")}
        # /raw then /v1/const, then the other way round: an even number of rounds (but for
        # --quick), so neither path always follows the other's 1,000 closing connections.
        high_rounds = 1 if args.rounds == 1 else 2 * max(1, (args.rounds - 1) // 2)
        for r in range(high_rounds):
            for config in configs:
                for path in ("/raw", "/v1/const")[::1 if r % 2 == 0 else -1]:
                    high[config, path].append(
                        wrk(configs[config].url + path, args.high, args.high_seconds))
            print(f"... {args.high} connections: " + ", ".join(
                f"{c} {p} {h[-1].rps:,.0f}/s p99 {h[-1].p99 * 1000:,.0f} ms"
                for (c, p), h in high.items()), flush=True)
        for variant in variants.values():
            variant.check_alive()
            variant.stop(timeout=15.0)
        variants.clear()
        cold = cold_key(server)
        print(f"... herd: /v1/herd, {args.connections} connections for "
              f"{args.herd_seconds:g} s", flush=True)
        herded = herd(server, herd_log, args.connections, args.herd_seconds)
        # The controls the herd is read against (bench/noise.py): the same load on the raw
        # WSGI app, then, with every server stopped, a lone busy loop.
        print(f"... control: /raw, {args.connections} connections for "
              f"{args.herd_seconds:g} s", flush=True)
        herded["control"] = noise.control_tail(server.port, "/raw", args.connections,
                                               args.herd_seconds)
        server.check_alive()
        server.stop(timeout=15.0)
        server = None
        print(f"... control: a lone busy loop for {args.herd_seconds / 2:g} s", flush=True)
        herded["stalls"] = noise.cpu_stalls(args.herd_seconds / 2)
        print("... profiling a hot /v1 hit in-process, fast path off and on", flush=True)
        from .profile_hit import profile_hits
        profile = profile_hits(memcached.address, n=5000 if args.quick else 20000)
    finally:
        if server is not None:
            server.stop(timeout=15.0)
        for variant in variants.values():
            variant.stop(timeout=15.0)
        memcached.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def med(values: list[Wrk], attr: str) -> float:
        return float(statistics.median(getattr(v, attr) for v in values))

    raw = med(runs["/raw"], "rps")
    rows = [{"label": label, "path": path, "rps": med(runs[path], "rps"),
             "ratio": med(runs[path], "rps") / raw, "p99": med(runs[path], "p99"),
             # Each round's ratio to that round's raw WSGI run: how much of the spread is
             # the machine (shown next to the table; the targets use the medians).
             "per_round": [w.rps / r.rps for w, r in zip(runs[path], runs["/raw"],
                                                           strict=True)],
             "errors": sum(v.errors for v in runs[path])} for label, path in ROUTES]
    high_rows = [{"config": c, "path": p, "rps": med(h, "rps"), "p99": med(h, "p99"),
                  "p99_per_round": [v.p99 for v in h],
                  "timeouts": int(med(h, "timeouts")), "errors": sum(v.errors for v in h)}
                 for (c, p), h in high.items()]
    doc = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "rows": rows, "high": high_rows, "cold": cold, "herd": herded,
           "seconds": time.monotonic() - began, "load_average": load_average}
    print()
    print(f"{'':42}{'req/s':>10}{'x raw':>8}{'p99 ms':>9}{'errors':>8}")
    for row in rows:
        print(f"{row['label']:42}{row['rps']:>10,.0f}{row['ratio']:>8.2f}"
              f"{row['p99'] * 1000:>9.1f}{row['errors']:>8}")
    print("x raw per round (each against that round's raw run): " + "; ".join(
        f"{r['path']} " + " ".join(f"{x:.2f}" for x in r["per_round"])
        for r in rows if r["path"] != "/raw"))
    fc = next(r for r in rows if r["path"] == "/fc")["rps"]
    v1 = next(r for r in rows if r["path"] == "/v1/const")["rps"]
    print(f"/v1 hit vs Flask-Caching @cached hit: {v1 / fc:.2f}x")
    print(f"\nat {args.high} connections, {args.high_seconds:g} s, wrk --timeout 5s:")
    for h in high_rows:
        print(f"  {h['config']:40} {h['path']:12}{h['rps']:>10,.0f} req/s  "
              f"p99 {h['p99'] * 1000:,.0f} ms ({_ms(h['p99_per_round'])})  "
              f"timeouts {h['timeouts']}  errors {h['errors']}")
    print(f"\ncold key, {cold['readers']} simultaneous readers, 1 s origin: "
          f"{cold['fetches']:g} origin fetch(es), {cold['ok']} answered 200, "
          f"X-Cache {cold['x_cache']}, wait p50 {cold['p50']:.2f} s, slowest reader "
          f"{cold['max']:.2f} s")
    print(herd_line(herded))
    print("  control: " + noise.control_line(herded["control"]))
    print("  control: " + noise.stalls_line(herded["stalls"]))
    print("\ntargets:")
    for target, value, ok in targets(doc):
        print(f"  {'MET    ' if ok else 'NOT MET'} {target}: {value}")
    keys = "100000" if args.quick else "1000000"
    print(f"... RSS through {int(keys):,} distinct keys (python -m bench.memory)", flush=True)
    memory = subprocess.run([sys.executable, "-m", "bench.memory", "--keys", keys],
                            capture_output=True, text=True, cwd=REPO_ROOT).stdout
    print(memory)
    for label, (per_hit, _) in profile.items():
        print(f"profile {label}: {per_hit * 1e6:.0f} us per hit (in-process, cProfile off)")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    write_report(doc, profile, memory, args)
    return 0


def _ms(seconds: Sequence[float]) -> str:
    return ", ".join(f"{x * 1000:,.0f}" for x in seconds)


def targets(doc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 9's targets, each as (target, what this run measured, met)."""
    by_path = {r["path"]: r for r in doc["rows"]}
    v1, swr, fc = by_path["/v1/const"], by_path["/swr"], by_path["/fc"]
    high = {h["path"]: h for h in doc["high"] if h["config"] == "shipped"}
    raw_h, v1_h = high["/raw"], high["/v1/const"]
    h = doc["herd"]
    return [
        ("`/v1/NAME` hit >= 0.9x raw WSGI", f"{v1['ratio']:.2f}x", v1["ratio"] >= 0.9),
        ("`/v1/NAME` hit >= 2x Flask-Caching `@cached` hit", f"{v1['rps'] / fc['rps']:.2f}x",
         v1["rps"] / fc["rps"] >= 2.0),
        ("`@swr.cached` hit >= 0.8x raw WSGI", f"{swr['ratio']:.2f}x", swr["ratio"] >= 0.8),
        ("one origin fetch per key per window (herd; <= 1.25 counted as one)",
         f"{h['per_window']:.2f} per window", h["per_window"] <= 1.25),
        ("during refreshes no read slower than 2x the hot-read p99 (herd)",
         f"{h['slowest_during'] * 1000:,.0f} ms vs {h['hot_p99'] * 1000:,.1f} ms: "
         f"{h['ratio']:.1f}x (the raw WSGI app under the same load, its slowest read "
         f"against its p99: {h['control']['ratio']:.1f}x)", h["ratio"] <= 2.0),
        ("1,000 connections: `/v1` p99 no worse than raw WSGI's (shipped config)",
         f"{v1_h['p99'] * 1000:,.0f} ms vs {raw_h['p99'] * 1000:,.0f} ms (per round: "
         f"{_ms(v1_h['p99_per_round'])} vs {_ms(raw_h['p99_per_round'])})",
         v1_h["p99"] <= raw_h["p99"]),
        ("1,000 connections: no more timeouts than raw WSGI (shipped config)",
         f"{v1_h['timeouts']} vs {raw_h['timeouts']}", v1_h["timeouts"] <= raw_h["timeouts"]),
    ]


def write_report(doc: dict[str, Any], profile: dict[str, tuple[float, str]], memory: str,
                 args: argparse.Namespace) -> None:
    """docs/BENCHMARKS.md and its plot, from this run's numbers."""
    docs = REPO_ROOT / "docs"
    rows, high, cold, herded = doc["rows"], doc["high"], doc["cold"], doc["herd"]
    plot = "benchmarks.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.barh([r["label"] for r in rows][::-1], [r["ratio"] for r in rows][::-1])
        left.axvline(1.0, color="grey", lw=0.8)
        left.set_xlabel(f"requests/s relative to raw WSGI ({args.connections} connections)")
        right.barh([f"{h['config']} {h['path']}" for h in high][::-1],
                   [h["p99"] * 1000 for h in high][::-1])
        right.set_xlabel(f"p99 ms at {args.high} connections")
        fig.tight_layout()
        fig.savefig(docs / plot, dpi=90)
        plt.close(fig)
        plotted = f"![hit throughput and 1,000-connection tail]({plot})\n"
    except ImportError:
        plotted = "(matplotlib is not installed: no plot this run)\n"
    lines = [
        "# Benchmarks", "",
        "Written by `make bench` (`python -m bench.throughput"
        + (" --quick" if args.quick else "") + "`); every number below comes from one run, "
        "on one machine, so the ratios hold even when the absolute numbers are noisy. "
        f"{args.workers} gunicorn gevent workers with the shipped `deploy/gunicorn.conf.py` "
        "(Prometheus multiprocess mode and the access log on), their own memcached, wrk "
        f"with {args.connections} connections, {args.rounds} interleaved round(s) of "
        f"{args.seconds:g} s per route (each round starting one route later), medians. "
        f"{os.cpu_count()} CPUs shared with the load generator and memcached; load average "
        f"{doc['load_average']:.2f} when it started.",
        "",
        "| answer | req/s | x raw WSGI | p99 ms | errors |", "|---|---:|---:|---:|---:|",
        *[f"| {r['label']} | {r['rps']:,.0f} | {r['ratio']:.2f} | {r['p99'] * 1000:.1f} | "
          f"{r['errors']} |" for r in rows], "",
        "Each round against that round's raw WSGI run (the spread is the machine's): "
        + "; ".join(f"`{r['path']}` " + ", ".join(f"{x:.2f}" for x in r["per_round"])
                    for r in rows if r["path"] != "/raw") + ".", "",
        f"At {args.high} connections ({args.high_seconds:g} s, wrk `--timeout 5s`; "
        "`shipped` is `deploy/gunicorn.conf.py`, the others add the gunicorn arguments "
        "shown; all interleaved, the two paths in alternating order, medians):", "",
        "| gunicorn | path | req/s | p99 ms (per round) | timeouts | errors |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| `{h['config']}` | `{h['path']}` | {h['rps']:,.0f} | {h['p99'] * 1000:,.0f} "
          f"({_ms(h['p99_per_round'])}) | "
          f"{h['timeouts']} | {h['errors']} |" for h in high], "",
        f"A cold key read by {cold['readers']} simultaneous readers (origin 1 s): "
        f"{cold['fetches']:g} origin fetch(es), {cold['ok']} answers 200, X-Cache "
        f"{cold['x_cache']}, wait p50 {cold['p50']:.2f} s, slowest of the {cold['readers']} "
        f"readers {cold['max']:.2f} s.", "",
        "The " + herd_line(herded) + ".", "",
        "Its two controls, measured right after it (`bench/noise.py`): "
        + noise.control_line(herded["control"]) + "; and "
        + noise.stalls_line(herded["stalls"]) + ".", "",
        "## Issue 9's targets, judged on this run", "",
        "| target | this run | met |", "|---|---|---|",
        *[f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in targets(doc)], "",
        plotted,
        "The herd bench comparing `@swr.cached` with plain `@cached` (4 workers) is "
        "`python -m bench`, run by `make bench` right after this one; see `bench/README.md`.",
        "",
        "## Memory", "", "```", memory.strip(), "```", "",
        "## Where a hot hit's time goes", "",
        "In-process (no gunicorn, no network), `bench/profile_hit.py`: the same fresh "
        "`/v1` hit answered through Flask's dispatch (the fast path off: every hit before "
        "issue 9) and through the fast path. Top functions by own time under cProfile.", "",
    ]
    findings = REPO_ROOT / "bench" / "findings.md"
    if findings.exists():
        lines += [findings.read_text(encoding="utf-8").strip(), ""]
    for label, (per_hit, table) in profile.items():
        lines += [f"### {label}: {per_hit * 1e6:.0f} µs per hit", "", "```", table, "```", ""]
    (docs / "BENCHMARKS.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {docs / 'BENCHMARKS.md'} and {docs / plot}")


if __name__ == "__main__":
    sys.exit(main())
