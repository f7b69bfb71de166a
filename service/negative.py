"""Negative caching: a failed cold fetch is remembered for ``error_ttl`` seconds.

Without it, an origin that answers 500 is hit by every request that finds nothing
cached, and the readers waiting on the failed holder would each fetch again at once. The
record lives in memcached next to the entry (its own key), so every worker and host sees
it; the holder writes it *before* it releases the lease, so a waiter always finds the
record when it finds the lease gone.

A record is data read from a shared memcached: anything that is not exactly the shape
written here is ignored (no record), never trusted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .errors import CacheUnavailable, HTTPError, OriginError, OriginTimeout
from .store import MISS, Store


def error_key(key: str) -> str:
    return f"err\x00{key}"


def from_record(record: Any, now: float) -> HTTPError | None:
    """The error a stored record stands for, or ``None`` for anything unexpected.

    The record carries its own end (``until``, wall clock): one without it, or past it,
    is ignored, so an item written without an expiry (by accident or on purpose) cannot
    make a key answer 502 forever.
    """
    if not isinstance(record, dict):
        return None
    status, detail, until = record.get("status"), record.get("detail", ""), record.get("until")
    if status not in (502, 504) or not isinstance(detail, str):
        return None
    if not isinstance(until, int | float) or isinstance(until, bool) or until <= now:
        return None
    cls = OriginTimeout if status == 504 else OriginError
    return cls(f"{detail} (remembered for a few seconds)")


class ErrorMemo:
    """Remember and recall failed fetches per key.

    :param store: the SWR namespace's store.
    :param ttl: seconds a failure is remembered; ``0`` turns negative caching off.
    """

    def __init__(self, store: Store, ttl: float, clock: Callable[[], float] = time.time
                 ) -> None:
        self.store = store
        self.ttl = ttl
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def remember(self, key: str, exc: HTTPError) -> None:
        if not self.enabled or exc.status not in (502, 504):
            return
        try:
            self.store.set(error_key(key), {"status": exc.status, "detail": exc.detail,
                                            "until": self.clock() + self.ttl}, self.ttl)
        except CacheUnavailable:
            pass  # nobody else can see it either; the next reader simply fetches

    def recall(self, key: str) -> HTTPError | None:
        if not self.enabled:
            return None
        try:
            record = self.store.get(error_key(key))
        except CacheUnavailable:
            return None
        return None if record is MISS else from_record(record, self.clock())

    def forget(self, key: str) -> None:
        try:
            self.store.delete(error_key(key))
        except CacheUnavailable:
            pass
