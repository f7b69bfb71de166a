"""Every window boundary, XFetch and back-off, with a fake clock: no I/O."""

from __future__ import annotations

import math

import pytest

from service.readpath.freshness import (
    Action,
    State,
    Timing,
    Windows,
    backoff,
    decide,
    early_refresh,
    state,
)

W = Windows(max_age=60, stale_while_revalidate=600, stale_if_error=3600)
T = Timing(stored_at=1000.0, windows=W, fetch_seconds=2.0)


@pytest.mark.parametrize(("now", "expected"), [
    (1000.0, State.FRESH),
    (1059.999, State.FRESH),
    (1060.0, State.STALE),             # the boundary belongs to the later state
    (1659.999, State.STALE),
    (1660.0, State.ERROR_ONLY),
    (5259.999, State.ERROR_ONLY),
    (5260.0, State.GONE),
    (999.0, State.FRESH),              # a clock slightly behind the writer's
])
def test_state_at_each_boundary(now: float, expected: State) -> None:
    assert state(T, now) is expected


def test_lifetime_is_the_end_of_the_last_window() -> None:
    assert W.lifetime == 4260
    assert T.error_until == 1000 + W.lifetime


def never(_: object = None) -> float:
    return 0.999999  # ln(r) ~ 0: XFetch does not fire


@pytest.mark.parametrize(("now", "action"), [
    (1030.0, Action.SERVE),
    (1060.0, Action.SERVE_AND_REFRESH),
    (1660.0, Action.FETCH_OR_SERVE_ON_ERROR),
    (5260.0, Action.FETCH),
])
def test_decide(now: float, action: Action) -> None:
    assert decide(T, now, beta=1.0, rand=never).action is action


def test_decide_without_an_entry_fetches() -> None:
    d = decide(None, 0.0)
    assert d.action is Action.FETCH and d.state is None and not d.serves_now


def test_windows_of_zero_go_straight_from_fresh_to_gone() -> None:
    t = Timing(0.0, Windows(10))
    assert [state(t, x) for x in (9.99, 10.0)] == [State.FRESH, State.GONE]


def test_xfetch_fires_only_near_expiry_in_proportion_to_fetch_time() -> None:
    # r = e^-1 makes -ln(r) = 1: fires exactly when now + delta*beta >= fresh_until.
    r = math.exp(-1)
    assert not early_refresh(T, 1057.9, beta=1.0, rand=lambda: r)
    assert early_refresh(T, 1058.0, beta=1.0, rand=lambda: r)
    assert early_refresh(T, 1056.0, beta=2.0, rand=lambda: r)      # beta > 1: earlier
    assert not early_refresh(T, 1059.9, beta=0.0, rand=lambda: r)  # beta 0: off
    assert not early_refresh(Timing(1000.0, W, 0.0), 1059.9, 1.0, rand=lambda: r)
    assert early_refresh(T, 1031.0, beta=1.0, rand=lambda: 0.0)    # ln(0) = -inf
    assert decide(T, 1058.0, 1.0, rand=lambda: r).action is Action.SERVE_AND_REFRESH


def test_xfetch_probability_grows_towards_expiry() -> None:
    import random

    rng = random.Random(7)
    def rate(now: float) -> float:
        return sum(early_refresh(T, now, 1.0, rng.random) for _ in range(4000)) / 4000
    far, near = rate(1040.0), rate(1059.0)
    assert far < 0.01 < 0.5 < near


def test_backoff_is_exponential_jittered_and_capped() -> None:
    assert backoff(0, 1.0, 300.0) == 0.0
    lows = [backoff(n, 1.0, 300.0, rand=lambda: 0.0) for n in range(1, 12)]
    highs = [backoff(n, 1.0, 300.0, rand=lambda: 1.0) for n in range(1, 12)]
    assert lows[:4] == [0.5, 1.0, 2.0, 4.0]
    assert highs[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(highs) == 300.0
    assert backoff(10_000, 1.0, 300.0, rand=lambda: 1.0) == 300.0


def test_xfetch_never_fires_in_the_first_half_of_max_age() -> None:
    # A slow fetch (delta close to max_age) read thousands of times a second would
    # otherwise refresh right after every store.
    slow = Timing(stored_at=0.0, windows=Windows(5, 60), fetch_seconds=3.0)
    assert not early_refresh(slow, 2.49, beta=1.0, rand=lambda: 1e-9)
    assert early_refresh(slow, 2.5, beta=1.0, rand=lambda: 1e-9)
