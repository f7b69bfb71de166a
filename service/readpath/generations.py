"""Generations: one number per family of keys, part of every key of the family.

memcached cannot list or delete keys by prefix, so "forget all of them" is done the
other way round: every key of a ``/v1`` source (``src:NAME:GEN?...``) and of a memoized
function (``fn:NAME:GEN:...``) carries its family's generation, and bumping the
generation makes every old key unreachable at once. Old entries are never read again and
age out of memcached (and out of each worker's local tier) on their own.

A family is named by a string: a source's name (``[A-Za-z0-9_-]``) or ``fn:`` and a
function's name, so the two kinds never share a counter. The counter lives in memcached
in the store's ``gen`` family (:meth:`Store.child`).

Each worker reads a generation from memcached at most once per ``l1_ttl``: a bump
reaches the worker that made it at once and every other worker and host within
``l1_ttl``, like any other change seen through the local tier.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import CacheUnavailable
from ..memcache.store import KeyValue


def function_family(name: str) -> str:
    """The family of a memoized function's keys (``name`` as :mod:`service.readpath.keying`
    makes it: module and qualified name)."""
    return f"fn:{name}"


def _random_start() -> int:
    return 2**40 + int.from_bytes(os.urandom(8), "big") % (2**62 - 2**40)


class Generations:
    """This worker's view of every family's generation (see the module docstring).

    :param store: the SWR store, where the counters live.
    :param l1_ttl: how long a number read from memcached is used without asking again.
    :param monotonic: the clock of ``l1_ttl``.
    """

    def __init__(self, store: KeyValue, l1_ttl: float, monotonic: Callable[[], float]) -> None:
        self.store = store.child("gen")   # one counter per family, in a family of its own
        self.l1_ttl = l1_ttl
        self.monotonic = monotonic
        # family -> (generation, monotonic time it was read)
        self._known: dict[str, tuple[int, float]] = {}

    def remembered(self, family: str) -> tuple[int, float] | None:
        """What this worker last read (or bumped) for ``family`` and when (monotonic),
        without asking memcached (the fast path decides on it); ``None`` when it never
        did."""
        return self._known.get(family)

    def forget_known(self) -> None:
        """Drop what this worker knows: the next read of every family asks memcached."""
        self._known.clear()

    def current(self, family: str) -> int:
        """The family's generation, to build a key with.

        Read from memcached when this worker's copy is older than ``l1_ttl``. With
        memcached unreachable the last known number is used. A worker that knows none uses
        0 for this call only, and asks again on the next one: 0 is never a real generation
        (counters start at a random number of 2**40 or more), so nothing it may write under
        0 is ever taken for an entry of the current generation once memcached answers.
        """
        now = self.monotonic()
        cached = self._known.get(family)
        if cached is not None and now - cached[1] < self.l1_ttl:
            return cached[0]
        try:
            value = self.store.get_counter(family)
            if value is None:
                value = self._restart(family)
        except CacheUnavailable:
            if cached is None:
                return 0
            value = cached[0]
        self._known[family] = (value, now)
        return value

    def _restart(self, family: str) -> int:
        """A generation for a family whose counter is missing (its server died, restarted
        empty, or evicted it).

        It must never be a number the family had before: the entries of an old generation
        may still be on other servers, and a bump made since would be undone. So it is
        never a number any worker remembers (that one may be older than a bump it missed),
        nor one read off a clock: a fresh random number in [2**40, 2**62), which no earlier
        counter of the family had (those started the same way and moved by ones). Every
        entry of the family is computed anew: a lost counter costs misses, never an
        invalidation. ``add`` makes the workers agree on one number.
        """
        key = family
        start = _random_start()
        self.store.add_counter(key, start)
        return self.store.get_counter(key) or start

    def bump(self, family: str) -> int:
        """Invalidate every key of ``family``: in this worker at once, in every other
        worker and host within ``l1_ttl``. Returns the new generation.

        :raises CacheUnavailable: memcached could not be asked (nothing was invalidated).
        """
        key = family
        value = self.store.incr(key)
        if value is None:
            self._restart(family)
            value = self.store.incr(key)
            if value is None:  # gone again at once (evicted, or its server restarted)
                raise CacheUnavailable(f"the generation of {family!r} could not be bumped")
        # This worker uses the new number at once, even if memcached fails right after; a
        # bump another worker makes meanwhile reaches it within l1_ttl, like any other.
        self._known[family] = (value, self.monotonic())
        return value
