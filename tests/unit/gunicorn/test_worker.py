"""``service.gunicorn.worker.post_request``: after a keep-alive response, a gevent worker's
connection greenlet lets everything else that is ready run first."""

from __future__ import annotations

from typing import Any

import gevent

from service.gunicorn.worker import next_turn, post_request


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


def test_a_second_answer_before_the_loop_ran_waits_for_the_next_turn() -> None:
    ran: list[str] = []
    other = gevent.spawn(steps, ran, 3)
    request = Request()
    try:
        # The connection's first answer: nothing says the loop has not run since its last
        # one (it had none), so it goes on at once, as a connection that waited would.
        post_request(None, request, {}, Response(closing=False))
        assert ran == []
        # Its next request was already there: answered in the same iteration of the loop,
        # so it waits for the next turn, and everything ready runs first.
        post_request(None, request, {}, Response(closing=False))
        assert ran == ["step 0", "step 1", "step 2"]
    finally:
        other.kill()


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

