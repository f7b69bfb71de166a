"""The suite's greenlet leak check (tests/conftest.py) sees what it must and nothing else."""

from __future__ import annotations

import gevent
import gevent.event
from gevent.hub import Hub
from gevent.threadpool import ThreadPool

from tests.conftest import describe_greenlet, live_greenlets


def test_a_waiting_greenlet_is_live_and_named_until_it_finishes() -> None:
    release = gevent.event.Event()

    def waits_for_release() -> None:
        release.wait()

    job = gevent.spawn(waits_for_release)
    assert job in live_greenlets()                     # scheduled counts, not only started
    gevent.sleep(0)
    assert job in live_greenlets()
    described = describe_greenlet(job)
    assert "waits_for_release" in described and "test_leak_check.py" in described
    release.set()
    job.join(timeout=5)
    assert job.dead
    assert job not in live_greenlets()


def test_a_greenlet_not_started_yet_is_named_by_its_function() -> None:
    def later() -> None:
        pass

    job = gevent.spawn_later(60, later)
    try:
        assert job in live_greenlets()
        assert describe_greenlet(job) == (
            "test_a_greenlet_not_started_yet_is_named_by_its_function.<locals>.later "
            "(not started yet)")
    finally:
        job.kill()
    assert job not in live_greenlets()


def test_gevent_s_own_greenlets_are_not_counted() -> None:
    # The thread pool starts a worker thread (with its own hub) on first use.
    assert gevent.get_hub().threadpool.spawn(lambda: 42).get(timeout=5) == 42
    live = live_greenlets()
    assert not [g for g in live if isinstance(g, Hub | ThreadPool._WorkerGreenlet)]
    assert gevent.getcurrent() not in live             # nor the test's own (main) greenlet
