"""Pure freshness policy: given an entry and a clock reading, what to do. No I/O.

An entry is FRESH for ``max_age`` after it was stored, then STALE for
``stale_while_revalidate`` (served at once, one background refresh), then usable only
when a refresh fails for ``stale_if_error`` (RFC 5861), then GONE. memcached's own expiry
is the end of the last window, so a GONE entry is normally simply absent.

Probabilistic early refresh (XFetch: Vattani, Chierichetti, Lowenstein, "Optimal
Probabilistic Cache Stampede Prevention", VLDB 2015) refreshes a hot key shortly *before*
it turns stale: a read at ``now`` triggers a background refresh when
``now - delta * beta * ln(random()) >= fresh_until``, where ``delta`` is how long the last
fetch took. The closer to expiry and the slower the fetch, the likelier; with many readers
one of them fires early, so readers never see the key stale.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass


class State(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"
    ERROR_ONLY = "error_only"
    GONE = "gone"


@dataclass(frozen=True)
class Windows:
    """The three windows of a cached resource, in seconds (``Cache-Control`` names)."""

    max_age: float
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0

    @property
    def lifetime(self) -> float:
        """From storing to GONE: what memcached's expiry is set to."""
        return self.max_age + self.stale_while_revalidate + self.stale_if_error


@dataclass(frozen=True)
class Timing:
    """When a stored entry changes state, and how long its fetch took."""

    stored_at: float
    windows: Windows
    fetch_seconds: float = 0.0

    @property
    def fresh_until(self) -> float:
        return self.stored_at + self.windows.max_age

    @property
    def stale_until(self) -> float:
        return self.fresh_until + self.windows.stale_while_revalidate

    @property
    def error_until(self) -> float:
        return self.stale_until + self.windows.stale_if_error

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)


def state(timing: Timing, now: float) -> State:
    """The state at ``now``; each boundary belongs to the later state."""
    if now < timing.fresh_until:
        return State.FRESH
    if now < timing.stale_until:
        return State.STALE
    if now < timing.error_until:
        return State.ERROR_ONLY
    return State.GONE


def early_refresh(
    timing: Timing, now: float, beta: float, rand: Callable[[], float] = random.random
) -> bool:
    """XFetch: whether a read of a FRESH entry at ``now`` should refresh it early.

    Never in the first half of ``max_age``. XFetch draws once per read, so with thousands
    of reads a second and a fetch that takes a good part of ``max_age`` it fires right
    after every store, refreshing back to back (measured in ``bench/``: 4 fetches where
    3 windows elapsed). The floor keeps it to about one early refresh per window.
    """
    if beta <= 0 or timing.fetch_seconds <= 0:
        return False
    if now < timing.fresh_until - timing.windows.max_age / 2:
        return False
    r = rand()
    if r <= 0.0:
        return True  # ln(0) is -inf: the formula says refresh
    return now - timing.fetch_seconds * beta * math.log(r) >= timing.fresh_until


class Action(enum.Enum):
    SERVE = "serve"                        # FRESH: answer from cache
    SERVE_AND_REFRESH = "serve_refresh"    # FRESH but XFetch fired, or STALE
    FETCH_OR_SERVE_ON_ERROR = "fetch_sie"  # fetch now; serve the old copy if that fails
    FETCH = "fetch"                        # nothing usable: fetch and wait


@dataclass(frozen=True)
class Decision:
    action: Action
    state: State | None

    @property
    def serves_now(self) -> bool:
        return self.action in (Action.SERVE, Action.SERVE_AND_REFRESH)


def decide(
    timing: Timing | None, now: float, beta: float = 1.0,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """What a read does with what it found (``None``: nothing in either tier)."""
    if timing is None:
        return _DECISIONS[Action.FETCH, None]
    s = state(timing, now)
    if s is State.FRESH:
        refresh = early_refresh(timing, now, beta, rand)
        return _DECISIONS[Action.SERVE_AND_REFRESH if refresh else Action.SERVE, s]
    if s is State.STALE:
        return _DECISIONS[Action.SERVE_AND_REFRESH, s]
    if s is State.ERROR_ONLY:
        return _DECISIONS[Action.FETCH_OR_SERVE_ON_ERROR, s]
    return _DECISIONS[Action.FETCH, s]


# Every decision there can be, made once: decide() runs on every read, fast path
# included, and a frozen dataclass costs more to build than the whole decision.
_DECISIONS: dict[tuple[Action, State | None], Decision] = {
    (a, s): Decision(a, s) for a in Action for s in (*State, None)}


def backoff(failures: int, base: float, cap: float, rand: Callable[[], float] = random.random
            ) -> float:
    """Seconds to wait before retrying a key after ``failures`` failed refreshes in a row.

    Exponential with "full jitter" (uniform between half and all of the step), so the
    workers that saw the same failure do not retry in lockstep; never above ``cap``.
    """
    if failures <= 0:
        return 0.0
    step = min(cap, base * 2.0 ** min(failures - 1, 30))
    return float(step * (0.5 + 0.5 * rand()))
