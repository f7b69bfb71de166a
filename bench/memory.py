"""RSS through 1,000,000 distinct keys: ``python -m bench.memory`` (part of ``make bench``).

Pushes N distinct keys (default 1,000,000) through the per-worker structures that grow with
the number of keys a worker sees, configured as shipped (``settings.toml`` defaults):
the in-process tier (``l1_max_entries``, ``l1_max_bytes``), each entry with a rendered
answer attached as the fast path does, and the admin's ledger. Prints the process's RSS
before, along the way and after: bounded tiers keep it flat once they are full.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from service.config import CacheSettings
from service.flask.fastpath import Rendered
from service.readpath.entry import Entry
from service.readpath.freshness import Windows
from service.readpath.ledger import Ledger
from service.readpath.loader import Job
from service.readpath.tiers import LocalTier


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--value-bytes", type=int, default=1000)
    args = p.parse_args(argv)
    defaults = CacheSettings()
    tier = LocalTier(defaults.l1_max_entries, defaults.l1_max_bytes)
    ledger = Ledger(max(1000, defaults.l1_max_entries))
    windows = Windows(60, 600, 3600)
    padding = "x" * args.value_bytes
    gc.collect()
    start = rss_mib()
    samples = [(0, start)]
    step = max(1, args.keys // 10)
    for i in range(args.keys):
        key = f"src:items:0?id={i}"
        entry = Entry.create({"id": i, "padding": padding}, 1000.0, windows, 0.01)
        tier.put(key, entry, 0.0)
        item = tier.get(key)
        if item is not None:
            body = b'{"id":%d,"padding":"%s"}' % (i, padding.encode())
            tier.attach(key, item, Rendered("200 OK", (("Content-Type", "application/json"),
                                                      ("Content-Length", str(len(body)))),
                                            body), len(body) + 200)
        ledger.seen(Job(key, lambda: None, windows, source="items", params={"id": str(i)}))
        if (i + 1) % step == 0:
            samples.append((i + 1, rss_mib()))
    gc.collect()
    end = rss_mib()
    print(f"memory bench: {args.keys:,} distinct keys, values of ~{args.value_bytes} bytes, "
          f"l1_max_entries={defaults.l1_max_entries:,}, "
          f"l1_max_bytes={defaults.l1_max_bytes // 2**20} MiB")
    for n, rss in samples:
        print(f"  after {n:>9,} keys: RSS {rss:7.1f} MiB")
    print(f"RSS before {start:.1f} MiB, after {end:.1f} MiB; tier holds {len(tier):,} entries "
          f"({tier.bytes / 2**20:.1f} MiB counted), ledger {len(ledger):,} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
