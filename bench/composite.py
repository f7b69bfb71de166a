"""Composite and executor timings: ``python -m bench.composite``.

Starts its own memcached, the counting test origin (tests/origin.py) and
``gunicorn -c deploy/gunicorn.conf.py wsgi:app`` with one worker, then measures two claims
of the sources (printed, not asserted; the numbers depend on the machine):

1. A ``composite`` source fetches its parts concurrently: with three ``http`` parts whose
   origin answers after ``--delay`` seconds each, a cold composite read should take about
   one delay, not the sum of the parts' cold reads. A warm read is a HIT.
2. ``executor = "process"`` keeps a CPU-bound ``python`` source from stalling the other
   requests of its worker: the p99 latency of a cheap cached read, sampled while a
   pure-Python function burns CPU for ``--burn`` seconds in a refresh, with
   ``executor = "thread"`` (the GIL is held in the worker) and ``"process"`` (a niced
   child process).

Every process it starts is stopped at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from tests.servers import (
    GunicornProcess,
    MemcachedProcess,
    OriginServer,
    http_get,
    log_tail,
    memcached_binary,
)

PARTS = ("part1", "part2", "part3")
FIX = "tests.sources_fixtures"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.composite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=1.0,
                        help="seconds each composite part's origin takes (default 1)")
    parser.add_argument("--runs", type=int, default=3,
                        help="cold composite reads to time (default 3)")
    parser.add_argument("--burn", type=float, default=3.0,
                        help="seconds the CPU-bound source burns (default 3)")
    parser.add_argument("--probes", type=int, default=4,
                        help="concurrent clients sending the cheap read (default 4)")
    parser.add_argument("--skip-executor", action="store_true",
                        help="only measure the composite")
    return parser.parse_args(argv)


def write_settings(path: Path, memcached: MemcachedProcess, origin: OriginServer,
                   delay: float, burn: float) -> None:
    lines = [
        "[cache]",
        f'servers = ["{memcached.address}"]',
        'key_prefix = "bench-composite"',
        "[refresh]",
        f"fetch_timeout = {max(30.0, 4 * (delay + burn))}",
        "xfetch_beta = 0.0",
        "[server]",
        'log_format = "text"',
        f"monitor_threshold = {max(60.0, 10 * burn)}",  # the thread case blocks it on purpose
    ]
    windows = ["max_age = 600", "stale_while_revalidate = 600", "stale_if_error = 3600"]
    for part in PARTS:
        lines += [f"[sources.{part}]", 'kind = "http"',
                  f'url = "{origin.url}/{part}?delay={delay}&id={{id}}"', *windows]
    lines += ["[sources.trio]", 'kind = "composite"', f"parts = {list(PARTS)!r}".replace(
        "'", '"'), *windows]
    lines += ["[sources.cheap]", 'kind = "python"', f'target = "{FIX}:echo"',
              'executor = "thread"', *windows]
    for executor in ("thread", "process"):
        lines += [f"[sources.burn_{executor}]", 'kind = "python"', f'target = "{FIX}:burn"',
                  f'executor = "{executor}"', *windows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def timed_get(url: str, timeout: float = 120.0) -> tuple[float, int, dict[str, str]]:
    started = time.perf_counter()
    status, headers, _ = http_get(url, timeout=timeout)
    return time.perf_counter() - started, status, headers


def expect(url: str, status: int, cache: str | None, got: tuple[float, int, dict[str, str]]
           ) -> float:
    elapsed, code, headers = got
    if code != status or (cache is not None and headers.get("x-cache") != cache):
        raise RuntimeError(f"GET {url} answered {code} X-Cache={headers.get('x-cache')!r}, "
                           f"expected {status} {cache}")
    return elapsed


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def measure_composite(base: str, runs: int, delay: float) -> list[str]:
    colds, sums, warms = [], [], []
    for _ in range(runs):
        # The parts alone, one after the other, on their own cold keys: the sum of the parts.
        key = uuid.uuid4().hex
        parts_total = 0.0
        for part in PARTS:
            url = f"{base}/v1/{part}?id=alone-{key}"
            parts_total += expect(url, 200, "MISS", timed_get(url))
        sums.append(parts_total)
        url = f"{base}/v1/trio?id=together-{key}"
        colds.append(expect(url, 200, "MISS", timed_get(url)))
        warms += [expect(url, 200, "HIT", timed_get(url)) for _ in range(20)]
    cold, total = statistics.median(colds), statistics.median(sums)
    return [
        f"composite of {len(PARTS)} http parts, origin delay {delay:g}s each, {runs} runs "
        "(medians):",
        f"  sum of the parts' cold reads  {total:8.3f} s",
        f"  cold composite read (MISS)    {cold:8.3f} s   "
        f"(each run: {', '.join(f'{c:.3f}' for c in colds)})",
        f"  composite / sum of parts      {cold / total:8.2f}     "
        f"(concurrent parts: about 1/{len(PARTS)} = {1 / len(PARTS):.2f})",
        f"  warm composite read (HIT)     {statistics.median(warms) * 1000:8.1f} ms  "
        f"(p99 {percentile(warms, 99) * 1000:.1f} ms over {len(warms)} reads)",
    ]


def sample_while(base: str, busy: threading.Event, probes: int, pause: float = 0.01
                 ) -> list[float]:
    """Latencies of a cheap HIT while ``busy`` is set: ``probes`` clients, each sending one
    request after another."""
    url = f"{base}/v1/cheap?probe=1"
    samples: list[float] = []
    errors: list[BaseException] = []

    def probe() -> None:
        try:
            while busy.is_set():
                samples.append(expect(url, 200, "HIT", timed_get(url)))
                time.sleep(pause)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            busy.clear()

    threads = [threading.Thread(target=probe, name=f"probe-{i}", daemon=True)
               for i in range(probes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a probe failed: {errors[0]}") from errors[0]
    return samples


def measure_executor(base: str, executor: str | None, burn: float, probes: int
                     ) -> list[float]:
    """Cheap-read latencies while ``burn_EXECUTOR`` burns CPU (None: nothing burns)."""
    url = f"{base}/v1/cheap?probe=1"
    timed_get(url)  # warm: from here on every probe is a HIT
    busy = threading.Event()
    busy.set()
    if executor is None:
        timer = threading.Timer(burn, busy.clear)
        timer.start()
        try:
            return sample_while(base, busy, probes)
        finally:
            timer.cancel()
    errors: list[BaseException] = []

    def burner() -> None:
        try:
            target = f"{base}/v1/burn_{executor}?seconds={burn}&tag={uuid.uuid4().hex}"
            expect(target, 200, "MISS", timed_get(target))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            busy.clear()

    thread = threading.Thread(target=burner, name=f"burn-{executor}", daemon=True)
    thread.start()
    try:
        samples = sample_while(base, busy, probes)
    finally:
        thread.join(timeout=burn * 10 + 60)
    if errors:
        raise RuntimeError(f"the {executor} burn failed: {errors[0]}") from errors[0]
    return samples


def executor_report(base: str, burn: float, probes: int) -> list[str]:
    # A first process-executor call starts the child; do it outside the measurement.
    warm = f"{base}/v1/burn_process?seconds=0.01&tag=warm-{uuid.uuid4().hex}"
    expect(warm, 200, "MISS", timed_get(warm))
    results = {name: measure_executor(base, executor, burn, probes)
               for name, executor in (("idle", None), ("thread", "thread"),
                                      ("process", "process"))}
    lines = [f"cheap cached read while a CPU-bound python source burns {burn:g}s "
             f"(gunicorn, 1 worker, {probes} concurrent probe clients):",
             f"  {'':22s}{'samples':>8s}{'p50 ms':>10s}{'p99 ms':>10s}{'max ms':>10s}"]
    titles = {"idle": "nothing burning", "thread": 'executor = "thread"',
              "process": 'executor = "process"'}
    for name, samples in results.items():
        lines.append(f"  {titles[name]:22s}{len(samples):8d}"
                     f"{statistics.median(samples) * 1000:10.1f}"
                     f"{percentile(samples, 99) * 1000:10.1f}{max(samples) * 1000:10.1f}")
    thread_p99 = percentile(results["thread"], 99)
    process_p99 = percentile(results["process"], 99)
    p50_ratio = statistics.median(results["thread"]) / statistics.median(results["process"])
    lines.append(f"  thread / process      p99 {thread_p99 / process_p99:.1f}x, "
                 f"p50 {p50_ratio:.1f}x")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    binary = memcached_binary()
    if binary is None:
        print("memcached is not installed (apt-get install memcached)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-composite-") as tmp, \
            contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        memcached = MemcachedProcess(binary, workdir)
        stack.callback(memcached.stop)
        memcached.start()
        origin = OriginServer(workdir)
        stack.callback(origin.stop)
        origin.start()
        settings = workdir / "settings.toml"
        write_settings(settings, memcached, origin, args.delay, args.burn)
        server = GunicornProcess(settings, workdir, workers=1)
        stack.callback(lambda: server.proc is not None and server.stop())
        try:
            server.start()
            base = server.url
            lines = measure_composite(base, args.runs, args.delay)
            if not args.skip_executor:
                lines += [""] + executor_report(base, args.burn, args.probes)
        except (RuntimeError, OSError) as exc:
            print(f"bench failed: {exc}\ngunicorn log tail:\n{log_tail(server.log_path)}",
                  file=sys.stderr)
            return 1
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
