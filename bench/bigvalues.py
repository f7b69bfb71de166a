"""Big values beside small hits: ``python -m bench.bigvalues [--main /work/main]``.

Eight clients read one cached 50 MB value over and over (an ``http`` source whose origin
answers 50 MB) while two others read a small cached value, through real gunicorn with two
gevent workers and a real memcached (``-m 1024``; the value is split into 1 MiB items).
Printed for each code tree, in the same run: the small reads' p50/p99 unloaded and beside
the big readers, the big reads done, the longest any one greenlet held a worker's hub
(ran without switching: what every other request of that worker waited), how late a
ticker in the worker woke, and the workers' idle and peak RSS.

``--main`` names a second tree to measure the same way, with its own ``.venv`` (the code
before this change: by default ``/work/main`` when it exists); the last line compares the
two. Both hub figures come from this bench's own gunicorn config, which extends the
tree's ``deploy/gunicorn.conf.py``: a ``greenlet.settrace`` hook times each greenlet's
run between two switches, in wall time and in the worker's CPU time (a run can be long
because the kernel did not run the worker; the three longest in CPU are printed), and a
greenlet asks to wake every 2 ms and logs each late wake-up, which counts a hub that is
merely busy (or a worker the kernel did not run, on a loaded machine) as well as a held
one. The peak RSS is the kernel's high-water mark, reset after warming up (as root;
otherwise sampled every 20 ms).

Every process it starts is stopped at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.servers import MemcachedProcess, child_pids, free_port, log_tail, memcached_binary

HERE = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
MIB = 1024 * 1024

# The bench's gunicorn config: the tree's own, plus a watcher of each worker's hub.
CONFIG = r'''
import os, runpy, time

for _name, _value in runpy.run_path(os.path.join(os.getcwd(), "deploy/gunicorn.conf.py")
                                    ).items():
    if not _name.startswith("__"):
        globals()[_name] = _value
_start = post_worker_init


def post_worker_init(worker):
    _start(worker)
    import gevent
    import greenlet

    gaps = os.environ["BENCH_GAPS_DIR"]
    late = open(os.path.join(gaps, "%d.late" % os.getpid()), "a", buffering=1)
    held = open(os.path.join(gaps, "%d.held" % os.getpid()), "a", buffering=1)
    hub = gevent.get_hub()
    since = [time.perf_counter(), time.thread_time()]

    def trace(event, args):
        # How long each greenlet other than the hub ran before it switched away: what it
        # kept every other request of the worker waiting (the hub's own turns include
        # its idle waits for I/O, so they are not counted).
        if event in ("switch", "throw"):
            now, cpu = time.perf_counter(), time.thread_time()
            ran, used = now - since[0], cpu - since[1]
            since[0], since[1] = now, cpu
            origin = args[0]
            if ran > 0.005 and origin is not hub:
                held.write("%.3f %.4f %.4f %s\n" % (time.time(), ran, used,
                                                     repr(origin)[:160].replace("\n", " ")))

    greenlet.settrace(trace)

    def watch():
        # Asks to wake every 2 ms: a late wake-up is a busy hub, a blocked one, or a
        # worker the kernel did not run.
        last = time.perf_counter()
        while True:
            gevent.sleep(0.002)
            now = time.perf_counter()
            wait, last = now - last - 0.002, now
            if wait > 0.005:
                late.write("%.3f %.4f\n" % (time.time(), wait))

    gevent.spawn(watch)
'''


class Origin:
    """An HTTP origin in this process: ``/big`` answers ``size`` bytes, ``/small`` a few."""

    def __init__(self, size: int) -> None:
        body = os.urandom(size)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                data = body if self.path.startswith("/big") else b'{"small": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_settings(path: Path, memcached: str, origin: str, size: int) -> None:
    path.write_text(f'''
[cache]
servers = ["{memcached}"]
key_prefix = "bigbench"

[refresh]
fetch_timeout = 60

[sources.big]
kind = "http"
url = "{origin}/big"
max_body_bytes = {size + MIB}
max_age = 3600
stale_while_revalidate = 600
stale_if_error = 3600

[sources.small]
kind = "http"
url = "{origin}/small"
max_age = 3600
stale_while_revalidate = 600
stale_if_error = 3600
''')


def get(port: int, path: str, timeout: float = 120.0) -> tuple[int, int, float]:
    """One GET on a new connection: (status, body bytes, seconds)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        size = 0
        while chunk := resp.read(MIB):
            size += len(chunk)
        return resp.status, size, time.perf_counter() - started
    finally:
        conn.close()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss(pid: int, field_name: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Row:
    tree: str
    small_unloaded: list[float] = field(default_factory=list)
    small_loaded: list[float] = field(default_factory=list)
    small_errors: int = 0
    big_reads: int = 0
    big_errors: int = 0
    idle_mib: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    held: list[tuple[float, float, str]] = field(default_factory=list)
    cold_held: list[tuple[float, float, str]] = field(default_factory=list)


@contextlib.contextmanager
def gunicorn(tree: Path, workdir: Path, settings: Path, gaps: Path) -> Iterator[
        tuple[int, list[int]]]:
    """Two gevent workers of ``tree`` (with ``tree/.venv``), on a free port."""
    port = free_port()
    config = workdir / "gunicorn.bench.conf.py"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GUNICORN_CMD_ARGS", "SERVICE_BIND", "SERVICE_WORKERS",
                        "PROMETHEUS_MULTIPROC_DIR")}
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env.update(SERVICE_SETTINGS=str(settings), BENCH_GAPS_DIR=str(gaps), PYTHONPATH=str(tree),
               XDG_RUNTIME_DIR=str(runtime))
    log_path = workdir / "gunicorn.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(tree / ".venv/bin/gunicorn"), "-c", str(config), "--workers", "2",
             "--bind", f"{LOOPBACK}:{port}", "--access-logfile", "/dev/null", "wsgi:app"],
            cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {log_tail(log_path)}")
            with contextlib.suppress(OSError):
                if get(port, "/healthz", 1.0)[0] == 200 and len(child_pids(proc.pid)) >= 2:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start: {log_tail(log_path)}")
            time.sleep(0.2)
        yield port, child_pids(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=5)


def measure(tree: Path, name: str, args: argparse.Namespace, origin: Origin,
            workroot: Path) -> Row:
    row = Row(name)
    workdir = workroot / name
    gaps = workdir / "gaps"
    gaps.mkdir(parents=True)
    binary = memcached_binary()
    if binary is None:
        raise SystemExit("memcached is not installed (apt-get install memcached)")
    memcached = MemcachedProcess(binary, workdir, extra_args=["-m", "1024", "-c", "4096"])
    memcached.start()
    try:
        settings = workdir / "settings.toml"
        write_settings(settings, memcached.address, origin.url, args.size_mib * MIB)
        with gunicorn(tree, workdir, settings, gaps) as (port, workers):
            status, size, took = get(port, "/v1/big")
            if status != 200 or size != args.size_mib * MIB:
                raise RuntimeError(f"{name}: warming /v1/big gave {status}, {size} bytes")
            print(f"  {name}: cold read of the big value {took:.2f} s", flush=True)
            for _ in range(2 * len(workers)):   # each worker reads it once from memcached
                get(port, "/v1/big")
            for _ in range(50):
                get(port, "/v1/small")
            time.sleep(1.0)
            row.idle_mib = [rss(pid, "VmRSS") / 1024 for pid in workers]
            for _ in range(args.small_unloaded):
                status, _, took = get(port, "/v1/small")
                row.small_unloaded.append(took)
            peaks_reset = all(reset_peak(pid) for pid in workers)
            sampled = dict.fromkeys(workers, 0)
            stop = threading.Event()
            lock = threading.Lock()

            def big_reader() -> None:
                while not stop.is_set():
                    try:
                        status, size, _ = get(port, "/v1/big")
                        ok = status == 200 and size == args.size_mib * MIB
                    except OSError:
                        ok = False
                    with lock:
                        row.big_reads += ok
                        row.big_errors += not ok

            def small_reader() -> None:
                while not stop.is_set():
                    try:
                        status, _, took = get(port, "/v1/small", timeout=30)
                    except OSError:
                        status, took = 0, 0.0
                    with lock:
                        if status == 200:
                            row.small_loaded.append(took)
                        else:
                            row.small_errors += 1
                    time.sleep(0.005)

            started = time.time()
            threads = [threading.Thread(target=big_reader) for _ in range(args.readers)]
            threads += [threading.Thread(target=small_reader) for _ in range(2)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                for pid in workers:
                    sampled[pid] = max(sampled[pid], rss(pid, "VmRSS"))
                time.sleep(0.02)
            stop.set()
            for thread in threads:
                thread.join(timeout=180)
            ended = time.time()
            row.peak_mib = [max(rss(pid, "VmHWM") if peaks_reset else 0, sampled[pid]) / 1024
                            for pid in workers]
            for path in gaps.glob("*.late"):
                for line in path.read_text().splitlines():
                    at, late = line.split()
                    if started <= float(at) <= ended:
                        row.gaps.append(float(late))
            for path in gaps.glob("*.held"):
                for line in path.read_text().splitlines():
                    at, ran, used, who = line.split(" ", 3)
                    if started <= float(at) <= ended:
                        row.held.append((float(ran), float(used), who))
                    elif float(at) < started:
                        row.cold_held.append((float(ran), float(used), who))
    finally:
        memcached.stop()
    return row


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def report(rows: list[Row]) -> None:
    def line(label: str, values: list[str]) -> None:
        print(f"  {label:<34}" + "".join(f"{v:>18}" for v in values))

    print()
    line("", [r.tree for r in rows])
    line("small reads unloaded p50 / p99", [
        f"{_ms(statistics.median(r.small_unloaded))} / {_ms(percentile(r.small_unloaded, .99))}"
        .replace(" ms /", " /") for r in rows])
    line("small reads beside big: count", [f"{len(r.small_loaded)} ({r.small_errors} err)"
                                           for r in rows])
    line("  p50", [_ms(statistics.median(r.small_loaded)) for r in rows])
    line("  p99", [_ms(percentile(r.small_loaded, .99)) for r in rows])
    line("  max", [_ms(max(r.small_loaded)) for r in rows])
    line("big reads done (errors)", [f"{r.big_reads} ({r.big_errors})" for r in rows])
    line("hub held by one greenlet: longest", [
        _ms(max((h[0] for h in r.held), default=0.0)) for r in rows])
    line("  of which CPU (longest CPU run)", [
        _ms(max((h[1] for h in r.held), default=0.0)) for r in rows])
    line("  runs over 20 ms / 100 ms (wall)", [
        f"{sum(h[0] > .02 for h in r.held)} / {sum(h[0] > .1 for h in r.held)}"
        for r in rows])
    line("  runs over 20 ms / 100 ms (CPU)", [
        f"{sum(h[1] > .02 for h in r.held)} / {sum(h[1] > .1 for h in r.held)}"
        for r in rows])
    line("  warm-up (the cold read): CPU", [
        _ms(max((h[1] for h in r.cold_held), default=0.0)) for r in rows])
    line("ticker: latest wake-up", [_ms(max(r.gaps, default=0.0)) for r in rows])
    line("ticker: late > 50 ms / > 500 ms", [
        f"{sum(g > .05 for g in r.gaps)} / {sum(g > .5 for g in r.gaps)}" for r in rows])
    line("worker RSS idle (MiB)", [" ".join(f"{m:.0f}" for m in r.idle_mib) for r in rows])
    line("worker RSS peak (MiB)", [" ".join(f"{m:.0f}" for m in r.peak_mib) for r in rows])
    if len(rows) == 2:
        before, after = rows[1], rows[0]
        ratio = percentile(before.small_loaded, .99) / percentile(after.small_loaded, .99)
        print(f"\n  small-read p99 beside big readers: {before.tree} / {after.tree} = "
              f"{ratio:,.1f}x; peak worker RSS {max(after.peak_mib):.0f} MiB ({after.tree}) "
              f"vs {max(before.peak_mib):.0f} MiB ({before.tree})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_main = Path("/work/main")
    parser.add_argument("--main", type=Path,
                        default=default_main if (default_main / ".venv").is_dir() else None,
                        help="a second tree (with its .venv) to measure as the baseline")
    parser.add_argument("--size-mib", type=int, default=50)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--small-unloaded", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the logs there (default: a temporary directory)")
    return parser.parse_args(argv)


def revision(tree: Path) -> str:
    git = shutil.which("git")
    if git is None:
        return "?"
    done = subprocess.run([git, "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    dirty = subprocess.run([git, "-C", str(tree), "status", "--porcelain", "--", "service"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+dirty" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    trees = [("this", HERE)]
    if args.main is not None and args.main.resolve() != HERE:
        trees.append(("main", args.main.resolve()))
    print(f"big values: {args.readers} readers of {args.size_mib} MiB beside 2 small readers, "
          f"{args.seconds:.0f} s, 2 gevent workers; "
          + ", ".join(f"{n} = {t} @ {revision(t)}" for n, t in trees), flush=True)
    origin = Origin(args.size_mib * MIB)
    rows = []
    try:
        with contextlib.ExitStack() as stack:
            workroot = args.workdir or Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bench-bigvalues-")))
            for name, tree in trees:
                rows.append(measure(tree, name, args, origin, workroot))
    finally:
        origin.stop()
    report(rows)
    for row in rows:
        longest = sorted(row.held, key=lambda h: h[1], reverse=True)[:3]
        for ran, used, who in longest:
            print(f"  {row.tree}: held {_ms(ran)} ({_ms(used)} CPU) by {who[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
