"""``service.gunicorn.worker.post_request``: after a keep-alive response, a gevent worker's
connection greenlet lets everything else that is ready run first."""

from __future__ import annotations

from typing import Any

import gevent
import pytest

from service.gunicorn import worker
from service.gunicorn.worker import BACK_TO_BACK, next_turn, post_request


class Response:
    """What the hook reads of gunicorn's ``Response``."""

    def __init__(self, closing: bool) -> None:
        self.closing = closing

    def should_close(self) -> bool:
        return self.closing


def steps(ran: list[str], n: int) -> None:
    """A greenlet that is ready ``n`` times in a row (each step a separate turn)."""
    for i in range(n):
        ran.append(f"step {i}")
        gevent.sleep(0)


def test_post_request_returns_after_every_ready_greenlet_ran_all_its_turns() -> None:
    ran: list[str] = []
    other = gevent.spawn(steps, ran, 3)
    try:
        post_request(None, None, {}, Response(closing=False))
        # sleep(0) would come back after the other's first turn; the next turn of the
        # loop comes only after everything that was ready ran (here: the other, to its end).
        assert ran == ["step 0", "step 1", "step 2"]
        assert other.dead
    finally:
        other.kill()


def test_post_request_does_not_wait_when_the_connection_closes_or_has_no_response() -> None:
    ran: list[str] = []
    other = gevent.spawn(ran.append, "other")
    try:
        post_request(None, None, {}, Response(closing=True))
        post_request(None, None, {}, None)
        assert ran == []          # the greenlet is about to end: nobody to wait for
    finally:
        other.kill()


def test_the_turn_comes_back_even_when_the_loop_is_never_idle() -> None:
    spinning = True

    def spin() -> None:           # other code of the worker that keeps the loop busy
        while spinning:
            gevent.sleep(0)

    spinner: Any = gevent.spawn(spin)
    try:
        next_turn()
        assert not spinner.dead   # back after one iteration, while the loop was still busy
    finally:
        spinning = False
        spinner.join(timeout=5)
        spinner.kill()


class Request:
    """What the hook keeps on gunicorn's per-connection unreader."""

    def __init__(self) -> None:
        self.unreader = type("Unreader", (), {})()


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The runs' clock, stopped: a test moves it by hand."""
    clock = [100.0]
    monkeypatch.setattr(worker, "clock", lambda: clock[0])
    return clock


def test_answers_before_the_loop_ran_wait_for_the_next_turn_after_a_bounded_run(
    now: list[float]   # cheap answers: no time passes
) -> None:
    ran: list[str] = []
    other = gevent.spawn(steps, ran, 3)
    more: Any = None
    request = Request()
    try:
        # The connection's first answer: nothing says the loop has not run since its last
        # one (it had none), so it goes on at once, as a connection that waited would.
        post_request(None, request, {}, Response(closing=False))
        # Its next requests were already there: answered in the same iteration of the
        # loop, BACK_TO_BACK of them go on at once...
        for _ in range(BACK_TO_BACK - 1):
            post_request(None, request, {}, Response(closing=False))
            assert ran == []
        # ...and then it waits for the next turn, and everything ready runs first.
        post_request(None, request, {}, Response(closing=False))
        assert ran == ["step 0", "step 1", "step 2"]
        # After its turn the run starts again: the next answers go on at once.
        more = gevent.spawn(ran.append, "more")
        for _ in range(BACK_TO_BACK - 1):
            post_request(None, request, {}, Response(closing=False))
        assert "more" not in ran
        post_request(None, request, {}, Response(closing=False))
        assert ran[-1] == "more"
    finally:
        other.kill()
        if more is not None:
            more.kill()


def test_a_run_of_slow_answers_waits_for_the_next_turn_after_the_first(
    now: list[float]
) -> None:
    ran: list[str] = []
    other = gevent.spawn(steps, ran, 3)
    request = Request()
    try:
        post_request(None, request, {}, Response(closing=False))
        now[0] += 2 * worker.RUN_SECONDS   # a slow answer, its request already waiting
        post_request(None, request, {}, Response(closing=False))
        # Far fewer than BACK_TO_BACK answers, but the run took RUN_SECONDS: the others
        # have their turn now, not after BACK_TO_BACK slow answers.
        assert ran == ["step 0", "step 1", "step 2"]
    finally:
        other.kill()


def test_cheap_answers_in_one_iteration_do_not_wait_before_the_bound(
    now: list[float]
) -> None:
    request = Request()
    ran: list[str] = []
    other = gevent.spawn(ran.append, "other")
    try:
        for _ in range(BACK_TO_BACK):
            now[0] += worker.RUN_SECONDS / (2 * BACK_TO_BACK)
            post_request(None, request, {}, Response(closing=False))
        assert ran == []          # within both bounds: no hub switch paid
    finally:
        other.kill()


def test_the_more_connections_are_ready_behind_a_run_the_shorter_it_may_be() -> None:
    assert worker.allowed_run(0) == worker.allowed_run(1) == BACK_TO_BACK
    assert worker.allowed_run(worker.ANSWERS_AHEAD // BACK_TO_BACK) == BACK_TO_BACK
    assert worker.allowed_run(worker.ANSWERS_AHEAD // 2) == 2
    assert worker.allowed_run(worker.ANSWERS_AHEAD) == 1
    assert worker.allowed_run(10 * worker.ANSWERS_AHEAD) == 1
    sizes = [worker.allowed_run(n) for n in range(4 * worker.ANSWERS_AHEAD)]
    assert sizes == sorted(sizes, reverse=True)


def test_with_many_connections_ready_a_second_answer_waits_for_the_next_turn(
    now: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "others_ready", lambda loop: 10 * worker.ANSWERS_AHEAD)
    ran: list[str] = []
    other = gevent.spawn(steps, ran, 3)
    request = Request()
    try:
        post_request(None, request, {}, Response(closing=False))
        assert ran == []
        post_request(None, request, {}, Response(closing=False))
        assert ran == ["step 0", "step 1", "step 2"]   # a run of one: the others first
    finally:
        other.kill()


def test_others_ready_counts_the_greenlets_waiting_for_a_turn() -> None:
    loop = gevent.get_hub().loop
    seen: list[int] = []

    def waiter() -> None:
        next_turn()
        seen.append(worker.others_ready(loop))

    waiters = [gevent.spawn(waiter) for _ in range(3)]
    try:
        gevent.sleep(0)               # all three wait for the turn now
        assert worker.others_ready(loop) >= 3
        gevent.joinall(waiters, timeout=5)
        # Resumed one after the other: the first saw the two still to run (beside any
        # other event of the loop's iteration), the second one, the last none.
        assert [n - seen[-1] for n in seen] == [2, 1, 0]
    finally:
        gevent.killall(waiters)


def test_an_answer_after_the_loop_ran_costs_no_turn() -> None:
    request = Request()
    post_request(None, request, {}, Response(closing=False))
    gevent.sleep(0.001)           # the connection waited for its next request: the loop ran
    ran: list[str] = []
    other = gevent.spawn(ran.append, "other")
    try:
        post_request(None, request, {}, Response(closing=False))
        assert ran == []          # no hub switch paid: the other greenlet has not run yet
    finally:
        other.kill()


def test_a_greenlet_killed_while_waiting_for_its_turn_is_not_resumed() -> None:
    resumed: list[str] = []

    def waiter() -> None:
        next_turn()
        resumed.append("waiter")

    victim = gevent.spawn(waiter)
    gevent.sleep(0)               # the victim now waits for its turn
    victim.kill()                 # killed meanwhile (a worker closing a connection)
    next_turn()                   # the next turn resumes the others, not the dead one
    next_turn()
    assert resumed == [] and victim.dead


def test_the_objects_a_worker_loaded_are_kept_out_of_full_collections() -> None:
    import gc

    from service.gunicorn.worker import freeze_startup_objects

    loaded = object.__new__(Response)          # something the worker made before serving
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        assert not any(o is loaded for o in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()

