"""The waiter's pure step function, every branch and their order."""

from __future__ import annotations

from service.errors import OriginError
from service.readpath.waiting import GiveUp, Raise, Serve, TakeOver, Wait, next_step, poll_delays

ENTRY = object()
ERROR = OriginError("origin down")


def test_a_landed_entry_is_served_even_if_an_error_is_remembered_and_the_lease_is_gone() -> None:
    assert next_step(ENTRY, False, ERROR, 5.0, 1.0, 0.1) == Serve(ENTRY)


def test_a_remembered_error_is_raised_rather_than_fetching_again() -> None:
    # With the lease gone the waiter would otherwise take over and hit the origin again.
    assert next_step(None, False, ERROR, 0.0, 10.0, 0.1) == Raise(ERROR)
    assert next_step(None, True, ERROR, 0.0, 10.0, 0.1) == Raise(ERROR)


def test_a_lapsed_lease_with_nothing_stored_means_take_over() -> None:
    assert next_step(None, False, None, 0.0, 10.0, 0.1) == TakeOver()


def test_waiting_past_the_deadline_gives_up_only_while_the_lease_is_held() -> None:
    assert next_step(None, True, None, 10.0, 10.0, 0.1) == GiveUp()
    assert next_step(None, False, None, 10.0, 10.0, 0.1) == TakeOver()


def test_the_wait_never_overshoots_the_deadline() -> None:
    assert next_step(None, True, None, 0.0, 10.0, 0.1) == Wait(0.1)
    assert next_step(None, True, None, 9.95, 10.0, 0.1) == Wait(0.05000000000000071)


def test_poll_delays_grow_to_the_cap_with_jitter() -> None:
    delays = poll_delays(first=0.01, factor=2.0, cap=0.04, rand=lambda: 0.5)
    assert [delays() for _ in range(5)] == [0.01, 0.02, 0.04, 0.04, 0.04]
    low = poll_delays(first=0.01, rand=lambda: 0.0)
    assert low() == 0.005
