"""Generations: one number per family of keys, part of every key of the family.

memcached cannot list or delete keys by prefix, so "forget all of them" is done the
other way round: every key of a ``/v1`` source (``src:NAME:GEN?...``) and of a memoized
function (``fn:NAME:GEN:...``) carries its family's generation, and bumping the
generation makes every old key unreachable at once. Old entries are never read again and
age out of memcached (and out of each worker's local tier) on their own.

A family is named by a string: a source's name (``[A-Za-z0-9_-]``) or ``fn:`` and a
function's name, so the two kinds never share a counter. The counter lives in memcached
under ``gen\\x00FAMILY`` (the store makes it a valid memcached key).

Each worker reads a generation from memcached at most once per ``l1_ttl``: a bump
reaches the worker that made it at once and every other worker and host within
``l1_ttl``, like any other change seen through the local tier.
"""

from __future__ import annotations

from .errors import CacheUnavailable
from .state import AppState

_KNOWN = "generations"
"""``state.extra[_KNOWN]``: family -> (generation, monotonic time it was read)."""


def function_family(name: str) -> str:
    """The family of a memoized function's keys (``name`` as :mod:`service.keying` makes
    it: module and qualified name)."""
    return f"fn:{name}"


def _key(family: str) -> str:
    return f"gen\x00{family}"


def _known(state: AppState) -> dict[str, tuple[int, float]]:
    known: dict[str, tuple[int, float]] = state.extra.setdefault(_KNOWN, {})
    return known


def remembered(state: AppState, family: str) -> tuple[int, float] | None:
    """What this worker last read (or bumped) for ``family`` and when (monotonic),
    without asking memcached (the fast path decides on it); ``None`` when it never did."""
    known: dict[str, tuple[int, float]] = state.extra.get(_KNOWN, {})
    return known.get(family)


def current(state: AppState, family: str) -> int:
    """The family's generation, to build a key with.

    Read from memcached when this worker's copy is older than ``l1_ttl``. With memcached
    unreachable the last known number is used. A worker that knows none uses 0 for this
    call only, and asks again on the next one: 0 is never a real generation (counters
    start at the clock in microseconds), so nothing it may write under 0 is ever taken
    for an entry of the current generation once memcached answers.
    """
    known = _known(state)
    now = state.monotonic()
    cached = known.get(family)
    if cached is not None and now - cached[1] < state.tiers.l1_ttl:
        return cached[0]
    try:
        value = state.store.get_counter(_key(family))
        if value is None:
            value = _restart(state, family, cached[0] if cached is not None else None)
    except CacheUnavailable:
        if cached is None:
            return 0
        value = cached[0]
    known[family] = (value, now)
    return value


def _restart(state: AppState, family: str, known: int | None = None) -> int:
    """A generation for a family whose counter is missing (its server died, restarted
    empty, or evicted it).

    It must never start again at a number it had before a bump, or the entries of that
    old generation (still on other servers) would be served again. A worker that knew the
    current generation puts that one back: the family's entries stay valid. A worker that
    knew none starts from the wall clock (in microseconds), larger than any number of
    bumps before it: every entry of the family is computed anew. ``add`` makes the
    workers agree on one number.
    """
    key = _key(family)
    start = known if known else int(state.clock() * 1_000_000)
    state.store.add_counter(key, start)
    return state.store.get_counter(key) or start


def bump(state: AppState, family: str) -> int:
    """Invalidate every key of ``family``: in this worker at once, in every other worker
    and host within ``l1_ttl``. Returns the new generation.

    :raises CacheUnavailable: memcached could not be asked (nothing was invalidated).
    """
    key = _key(family)
    value = state.store.incr(key)
    if value is None:
        cached = remembered(state, family)
        _restart(state, family, cached[0] if cached is not None else None)
        value = state.store.incr(key)
        if value is None:  # gone again at once (evicted, or its server restarted)
            raise CacheUnavailable(f"the generation of {family!r} could not be bumped")
    # This worker uses the new number at once, even if memcached fails right after; a bump
    # another worker makes meanwhile reaches it within l1_ttl, like any other.
    _known(state)[family] = (value, state.monotonic())
    return value
