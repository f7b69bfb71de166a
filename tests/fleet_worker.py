"""One "worker" of a simulated fleet, for the multi-process lease tests.

``python -m tests.fleet_worker --memcached HOST:PORT --origin URL --key KEY --greenlets N
[--lock-lease S] [--fetch-timeout S] [--path /slow?delay=0.5] [--pool-size 4] [--gate]``
builds the service's app against that memcached, then reads ``KEY`` from ``N`` greenlets at
once through :meth:`Region.get_or_load`, whose fetch GETs ``URL + --path`` and decodes
the JSON answer. The test drives it through its standard streams:

* it prints ``ready`` once the app is built, then waits for a line ``go`` on stdin, so that
  every process of the fleet starts reading at the same moment (a barrier, not a sleep);
* with ``--gate``, every fetch prints ``fetched`` after the origin answered and then waits
  for a line ``finish`` on stdin before it returns, so a test can act while this process
  holds the lease and is "inside" its fetch;
* at the end it prints one JSON line ``{"statuses", "values", "lease", "refreshes"}`` (the
  last two: this process's ``cache_lease`` and ``cache_refreshes`` counters) and exits 0.

Any exception: a JSON line ``{"error": ...}`` on stdout, the traceback on stderr, exit 1.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.socket  # noqa: E402

from service.app import create_app  # noqa: E402
from service.config import Settings, parse_settings  # noqa: E402
from service.flask.state import AppState, state_of  # noqa: E402
from service.observe import metrics  # noqa: E402
from service.readpath.freshness import Windows  # noqa: E402
from service.readpath.loader import Job  # noqa: E402

WINDOWS = Windows(60, 600, 3600)
SOURCE = "fleet"


class StdinLines:
    """Lines from fd 0, read without blocking the gevent hub (the lease renewer must keep
    running while a gated fetch waits for ``finish``)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.buffer = b""
        os.set_blocking(fd, False)

    def readline(self) -> str:
        while b"\n" not in self.buffer:
            gevent.socket.wait_read(self.fd)
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError("stdin closed before the expected line")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode().strip()

    def expect(self, word: str) -> None:
        line = self.readline()
        if line != word:
            raise RuntimeError(f"expected {word!r} on stdin, got {line!r}")


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def build_settings(args: argparse.Namespace) -> Settings:
    # The same test-friendly cache settings as tests.conftest.settings_for (which cannot be
    # imported here: the conftest loads pytest plugins).
    refresh: dict[str, Any] = {}
    if args.lock_lease is not None:
        refresh["lock_lease"] = args.lock_lease
    if args.fetch_timeout is not None:
        refresh["fetch_timeout"] = args.fetch_timeout
    return parse_settings({
        "cache": {"servers": [args.memcached], "key_prefix": args.key_prefix,
                  "connect_timeout": 0.5, "timeout": 0.5, "pool_size": args.pool_size,
                  "pool_timeout": 2.0, "circuit_reset": 0.2},
        "refresh": refresh,
    }, "<fleet_worker>")


def counters(metric: Any, label: str) -> dict[str, float]:
    """This process's values of a labelled Counter, by ``label``."""
    return {sample.labels[label]: sample.value
            for family in metric.collect() for sample in family.samples
            if sample.name.endswith("_total")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    app = create_app(build_settings(args))
    cache: AppState = state_of(app)
    stdin = StdinLines()
    url = args.origin.rstrip("/") + args.path

    def fetch() -> Any:
        with urllib.request.urlopen(url, timeout=30) as response:
            value = json.loads(response.read().decode("utf-8"))
        if args.gate:
            say("fetched")
            stdin.expect("finish")
        return value

    def read() -> tuple[str, Any]:
        with app.app_context():
            result = cache.region.get_or_load(Job(args.key, fetch, WINDOWS, source=SOURCE))
        return result.status, result.value

    say("ready")
    stdin.expect("go")
    readers = [gevent.spawn(read) for _ in range(args.greenlets)]
    gevent.joinall(readers)
    failed = [g.exception for g in readers if not g.successful()]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(readers)} reads failed; first: "
                           f"{type(failed[0]).__name__}: {failed[0]}") from failed[0]
    results = [g.value for g in readers]
    return {
        "statuses": [status for status, _ in results],
        "values": [value for _, value in results],
        "lease": counters(metrics.lease_total, "outcome"),
        "refreshes": counters(metrics.refreshes_total, "outcome"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fleet_worker", description=__doc__)
    parser.add_argument("--memcached", required=True, help="HOST:PORT")
    parser.add_argument("--key-prefix", default="test",
                        help="[cache] key_prefix: the test's own, to share its keys")
    parser.add_argument("--origin", required=True, help="base URL of the counting origin")
    parser.add_argument("--key", required=True)
    parser.add_argument("--greenlets", type=int, required=True)
    parser.add_argument("--lock-lease", type=float, default=None)
    parser.add_argument("--fetch-timeout", type=float, default=None)
    parser.add_argument("--path", default="/slow?delay=0.5")
    parser.add_argument("--pool-size", type=int, default=4, help="memcached connections")
    parser.add_argument("--gate", action="store_true",
                        help="after the origin answers, print 'fetched' and wait for 'finish'")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except Exception as exc:
        traceback.print_exc()
        say(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    say(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
