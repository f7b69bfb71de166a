"""The waiter's decision: what a reader does while another worker holds the claim. Pure.

A reader that found no usable entry and could not take the claim waits for the holder:
it polls the key's item in memcached (the entry, the holder's failure or pass record, or
the claim gone), and each observation goes through :func:`next_step`. Keeping the
decision pure (no I/O, the clock passed in) lets the unit tests walk every branch with a
fake clock; the loop that sleeps and reads lives in :mod:`service.loader`.

The order of the checks is the protocol:

1. an entry landed that the reader may serve: serve it (the holder's fetch is ours too);
2. the holder remembered a failure: raise it (do not fetch again what just failed);
3. the lease is gone without either: the holder died or gave up, so take over;
4. the reader waited as long as a holder may legitimately take: give up (504);
5. otherwise wait a little longer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Serve:
    """The holder's value landed: answer it."""

    entry: Any


@dataclass(frozen=True)
class Raise:
    """The holder's fetch failed and the failure is remembered: answer that failure."""

    error: Exception


@dataclass(frozen=True)
class TakeOver:
    """The lease lapsed with nothing stored: try to take the lease and fetch."""


@dataclass(frozen=True)
class GiveUp:
    """Waited past the deadline: the holder is too slow (answered as a timeout)."""


@dataclass(frozen=True)
class Wait:
    """Poll again after ``delay`` seconds."""

    delay: float


Step = Serve | Raise | TakeOver | GiveUp | Wait


def next_step(landed: Any | None, lease_present: bool, error: Exception | None,
              now: float, deadline: float, delay: float) -> Step:
    """Decide what a waiting reader does after one observation of memcached.

    :param landed: a servable entry found under the key, or ``None``.
    :param lease_present: whether somebody still holds the key's lease.
    :param error: the holder's remembered failure, or ``None``.
    :param now: a monotonic clock reading; ``deadline`` is on the same clock.
    :param delay: the next back-off delay (see :func:`poll_delays`).
    """
    if landed is not None:
        return Serve(landed)
    if error is not None:
        return Raise(error)
    if not lease_present:
        return TakeOver()
    if now >= deadline:
        return GiveUp()
    return Wait(min(delay, deadline - now))


def poll_delays(first: float = 0.01, factor: float = 1.6, cap: float = 0.25,
                rand: Callable[[], float] = random.random) -> Callable[[], float]:
    """Delays between polls: exponential up to ``cap``, with +/-50% jitter so the
    waiters of a fleet do not poll in step. Returns a function giving the next delay."""
    state = {"next": first}

    def next_delay() -> float:
        base = state["next"]
        state["next"] = min(cap, base * factor)
        return base * (0.5 + rand())

    return next_delay
