"""Wrong changes on purpose: each must turn a test red. ``python -m tests.mutants [M1 ...]``.

A protocol's guarantees are only as good as the tests that would notice them broken. Each
entry below is one deliberate mistake in the load protocol (drop the fence, release
without the owner, block the reader, compare two clocks, ...), the code it changes, and the
tests that must catch it. The script applies one at a time, runs those tests, and always
restores the file; it exits non-zero if a mistake went unnoticed. Not part of ``make test``
(it reruns parts of the suite fifteen times); run it after changing the protocol.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTANTS: list[tuple[str, str, str, str, list[str]]] = [
 ("M1 failure recorded after the claim is released (here: never)", "service/readpath/loader.py",
  "                self.give_back(claim, error_record(exc) if exc.status in (502, 504)\n"
  "                               else None, self.settings.error_ttl)",
  "                self.give_back(claim)",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_swr.py"]),
 ("M2 owner check then a plain delete", "service/readpath/lease.py",
  "            code = self.leases.mdelete(claim.key, claim.lease_cas)",
  "            code = self.leases.mdelete(claim.key)",
  ["tests/integration/test_lease.py"]),
 ("M3 backend write without a fence", "service/flask/coalesce.py",
  "self.memcached_ttl(timeout), cas=held.claim.fence)",
  "self.memcached_ttl(timeout), cas=None)",
  ["tests/integration/test_dropin.py"]),
 ("M4 schedule blocks a stale reader when the pool is full", "service/readpath/refresher.py",
  "        if self._pool.full():\n",
  "        if False:\n",
  ["tests/unit/readpath/test_pipeline.py"]),
 ("M5 waiters never woken when the loading request raises", "service/readpath/loader.py",
  "            flight.result.set_exception(_Pass())\n"
  "            raise\n"
  "        except BaseException:",
  "            raise\n        except BaseException:",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_uncacheable.py"]),
 ("M6 claim check skipped on the meta path", "service/readpath/tiers.py",
  "            if got.won:\n",
  "            if True:\n",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py"]),
 ("M7 an EX/NF write turned into a plain set", "service/readpath/tiers.py",
  "        if stored.ok:\n            claim.fence = stored.cas",
  "        if not stored.ok:\n"
  "            self.store.set(key, entry.to_wire(), "
  "entry.ttl(entry.stored_at))\n"
  "            stored = Stored('HD')\n"
  "        if stored.ok:\n"
  "            claim.fence = stored.cas",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py"]),
 ("M8 comparing two clocks (the writer's stamp trusted)", "service/readpath/tiers.py",
  "        lifetime = entry.windows.lifetime\n        if ttl is None",
  "        lifetime = entry.windows.lifetime\n        return entry\n        if ttl is None",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py"]),
 ("M9 the lease always granted", "service/readpath/lease.py",
  "        if not stored.ok:\n"
  "            metrics.lease_total.labels(\"contended\").inc()\n"
  "            return None",
  "        if False:\n            return None",
  ["tests/integration/test_extension.py", "tests/unit/readpath/test_pipeline.py"]),
 ("M10 the fence dropped", "service/readpath/tiers.py",
  "cas=claim.fence)\n        except CacheUnavailable:",
  "cas=None)\n        except CacheUnavailable:",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py"]),
 ("M11 the reader blocked by its refresh", "service/readpath/region.py",
  "        return self.refresher.schedule(\n"
  "            job.key, lambda: self.loader.refresh(job, self.never, seen), job.source)",
  "        self.loader.refresh(job, self.never, seen)\n        return True",
  ["tests/unit/readpath/test_pipeline.py"]),
 ("M12 a lost entry waits (no last good copy)", "service/readpath/region.py",
  "            lost = self._lost(job, look)",
  "            lost = None",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py"]),
 ("M13 a generation restored from the remembered number", "service/readpath/generations.py",
  "                value = self._restart(family)\n",
  "                value = cached[0] if cached is not None "
  "else self._restart(family)\n"
  "                self.store.add_counter(_key(family), value)\n",
  ["tests/unit/readpath/test_generations.py", "tests/integration/test_load_protocol.py"]),
 ("M14 no fair turn: a keep-alive connection never yields", "service/gunicorn/worker.py",
  "        next_turn()\n        iteration, run = loop.iteration, 0",
  "        iteration, run = loop.iteration, 0",
  ["tests/unit/gunicorn/test_worker.py",
   "tests/integration/test_fairness.py::"
   "test_a_connection_with_requests_always_waiting_does_not_starve_the_others"]),
 ("M15 a fair turn after every answer, ready or not", "service/gunicorn/worker.py",
  "    if run >= BACK_TO_BACK:",
  "    if True:",
  ["tests/unit/gunicorn/test_worker.py"]),
]


def main(only: list[str]) -> int:
    """Apply each wrong change, run its tests, undo it; non-zero if one stayed green."""
    survivors = 0
    for name, path, old, new, tests in MUTANTS:
        if only and name.split()[0] not in only:
            continue
        source = ROOT / path
        original = source.read_text()
        if original.count(old) != 1:
            print(f"SKIP  {name}: the code it changes is not there (update this list)")
            survivors += 1
            continue
        source.write_text(original.replace(old, new))
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "--timeout", "60",
                 "-p", "no:cacheprovider", *tests],
                cwd=ROOT, capture_output=True, text=True, timeout=900)
        finally:
            source.write_text(original)
        summary = [line for line in run.stdout.splitlines()
                   if line.startswith("FAILED") or " passed" in line or " failed" in line]
        print("RED  " if run.returncode else "GREEN", name, "|", " ".join(summary[-2:])[:300],
              flush=True)
        survivors += run.returncode == 0
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
