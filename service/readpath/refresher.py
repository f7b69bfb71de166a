"""The per-worker background refresher: a bounded pool of greenlets.

Why greenlets in the worker, and not APScheduler or a thread started at import (the first
seed question): gunicorn imports the app in each worker, but a thread started at import
time with ``preload_app`` runs in the master, and every worker holds its own copy of the
data anyway. Here each worker starts its refresher after fork (gunicorn's
``post_worker_init``, or lazily on first use), stale entries are recomputed in
greenlets that never block the hub, and the result goes to memcached, which every worker
and host shares; a lease makes one worker of the fleet do each recompute.

What it guarantees: at most ``concurrency`` refreshes at once per worker; one refresh
per key at a time in this worker (de-duplication); an app context pushed for every job,
so jobs check out their own memcached connection; failures logged and counted, never
swallowed silently; exponential back-off for a key whose refreshes keep failing; and
on shutdown, running jobs are given time to finish (drained) before being killed.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.pool
from flask import Flask

from ..observe import metrics
from ..observe.logs import event, key_hash
from .freshness import backoff

log = logging.getLogger(__name__)
BACKOFF_BASE = 1.0
MAX_FAILING_KEYS = 10_000


@dataclass
class Periodic:
    """A function recomputed every ``every`` seconds by one worker of the fleet."""

    name: str
    every: float
    run: Callable[[], Any]
    greenlet: Any = field(default=None, repr=False)


def next_run_in(period: float, started: float, now: float, rand: float) -> float:
    """Seconds until a periodic job's next run: ``period`` counted from the start of the
    run that just ended (``every=5`` runs every 5 s, not every 5 s plus the run's own
    time), less up to 5% of jitter so the workers' checks spread, and never a busy loop."""
    return max(0.05, period * (1.0 - 0.05 * rand) - (now - started))


class Refresher:
    """Runs refresh jobs in the background of one worker.

    :param app: jobs run inside ``app.app_context()``.
    :param concurrency: greenlets running at once.
    :param backoff_max: longest pause between retries of a failing key.
    """

    def __init__(self, app: Flask, concurrency: int, backoff_max: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.concurrency = concurrency
        self.backoff_max = backoff_max
        self.monotonic = monotonic
        self._pool: gevent.pool.Pool | None = None
        self._pid: int | None = None
        self._running: dict[str, gevent.Greenlet] = {}
        # Keys whose refreshes keep failing, oldest first; bounded, so a stream of
        # distinct failing keys cannot grow it without limit (the oldest is forgotten:
        # at worst that key is retried without its back-off).
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._periodic: dict[str, Periodic] = {}
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._pool is not None and self._pid == os.getpid()

    def start(self) -> None:
        """Start in this process; idempotent. Call it in the worker, after fork.

        gunicorn's ``post_worker_init`` calls it (after gevent patched the worker and
        the app was loaded); :meth:`schedule` also calls it lazily, which only ever
        happens while serving, so never at import time or in the master.
        """
        if self.started:
            return
        self._pool = gevent.pool.Pool(self.concurrency)
        self._pid = os.getpid()
        self._running.clear()
        self._stopping = False
        for job in self._periodic.values():
            job.greenlet = gevent.spawn(self._periodic_loop, job)
        log.info("refresher started in pid %s (concurrency %s)", self._pid, self.concurrency)

    def stop(self, timeout: float = 10.0) -> int:
        """Drain: stop taking jobs, wait up to ``timeout`` for running ones, kill the rest.

        :return: how many jobs had to be killed.
        """
        if not self.started or self._pool is None:
            return 0
        self._stopping = True
        loops = [job.greenlet for job in self._periodic.values() if job.greenlet is not None]
        # A periodic loop mid-refresh is killed like any job (its finally-blocks release
        # the lease); waiting for it means no greenlet of ours outlives stop().
        gevent.killall(loops, block=True, timeout=timeout)
        for job in self._periodic.values():
            job.greenlet = None
        self._pool.join(timeout=timeout)
        left = len(self._pool)
        if left:
            log.warning("refresher: killing %s refreshes still running at shutdown", left)
            self._pool.kill(timeout=1.0)  # their finally-blocks release leases
        self._pool = None
        return left

    # -- jobs --------------------------------------------------------------------------

    def is_running(self, key: str) -> bool:
        return key in self._running

    def schedule(self, key: str, job: Callable[[], Any], source: str = "-",
                 claimed: bool = False) -> bool:
        """Run ``job`` for ``key`` in the background unless it is already running, backing
        off, or the pool is full. Never blocks the caller.

        :return: whether a job was started.
        """
        if self._stopping:
            return False
        self.start()
        assert self._pool is not None
        if key in self._running:
            return False  # one refresh per key per worker
        failures, retry_at = self._failures.get(key, (0, 0.0))
        if failures and self.monotonic() < retry_at and not claimed:
            # Backing off. Not for a job that already holds the key's fleet-wide claim
            # (a lost entry): nobody else will refill it while this worker waits.
            return False
        if self._pool.full():
            # A full pool would block the reader; the next stale read schedules again.
            metrics.refreshes_total.labels(source, "skipped").inc()
            return False
        greenlet = self._pool.spawn(self._run, key, job, source)
        self._running[key] = greenlet
        return True

    def _run(self, key: str, job: Callable[[], Any], source: str) -> None:
        metrics.refreshes_in_flight.inc()
        try:
            with self.app.app_context():
                job()
        except Exception as exc:  # noqa: BLE001 - the boundary of a background job
            failures = self._failures.get(key, (0, 0.0))[0] + 1
            delay = backoff(failures, BACKOFF_BASE, self.backoff_max)
            self._failures[key] = (failures, self.monotonic() + delay)
            self._failures.move_to_end(key)
            while len(self._failures) > MAX_FAILING_KEYS:
                self._failures.popitem(last=False)
            event(log, logging.WARNING, "refresh_retry",
                  f"{source}: background refresh (key {key_hash(key)}) failed {failures} "
                  f"time(s), next try in {delay:.1f}s: {type(exc).__name__}: {exc}",
                  source=source, key=key, failures=failures)
        else:
            self._failures.pop(key, None)
        finally:
            metrics.refreshes_in_flight.dec()
            self._running.pop(key, None)

    def failures(self, key: str) -> int:
        return self._failures.get(key, (0, 0.0))[0]

    def wait(self, key: str, timeout: float | None = None) -> bool:
        """Wait for the running job of ``key`` (tests, admin). ``True`` when none runs."""
        greenlet = self._running.get(key)
        if greenlet is None:
            return True
        greenlet.join(timeout=timeout)
        return bool(greenlet.dead)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job runs (tests, admin). ``True`` when the pool is idle."""
        if self._pool is None:
            return True
        return bool(self._pool.join(timeout=timeout))

    # -- periodic functions ------------------------------------------------------------

    def register(self, name: str, every: float, run: Callable[[], Any]) -> None:
        """Recompute ``run`` every ``every`` seconds (see :meth:`SWR.periodic`)."""
        job = self._periodic[name] = Periodic(name, every, run)
        if self.started:
            job.greenlet = gevent.spawn(self._periodic_loop, job)

    def _periodic_loop(self, job: Periodic) -> None:
        while not self._stopping:
            started = self.monotonic()
            delay = job.every
            try:
                with self.app.app_context():
                    delay = job.run()
            except Exception as exc:  # noqa: BLE001 - keep the loop alive; run() counts
                log.exception("periodic %s failed: %s: %s", job.name, type(exc).__name__, exc)
            gevent.sleep(next_run_in(float(delay or job.every), started, self.monotonic(),
                                     random.random()))

