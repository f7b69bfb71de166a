"""What the admin reads back from memcached is checked before it is used or shown.

The registry's records, its rings of errors and blocked-hub reports, and the per-minute
history are written by our workers, but memcached is shared: anyone who reaches it can
write an item that decodes (the codec carries infinities, NaN, integers of thousands of
digits, decimals, tuples) but is absurd. One such number used in arithmetic, compared, or
put in a JSON answer would be a 500 on every admin request until the item expired. So a
field is accepted only when it has exactly the type we write and lies within bounds (the
same bounds as the read path's envelopes: :mod:`service.readpath.entry`); a record or an
item that fails is treated as absent, and the next write of its bucket or slot replaces it.
"""

from __future__ import annotations

import math
from typing import Any

from ..readpath.entry import MAX_SECONDS, MAX_TIME

MAX_COUNT = 2**53
"""Counts, sizes and process ids: exact in a float and in JavaScript."""


def number(raw: Any, low: float, high: float) -> float | None:
    """``raw`` as a float when it is an ``int`` or ``float`` (never a bool, a decimal, a
    string) that is finite and within ``[low, high]``; else ``None``."""
    kind = type(raw)
    if kind is int:
        if not -MAX_COUNT <= raw <= MAX_COUNT:   # no float() of 5,000 digits
            return None
    elif kind is not float:
        return None
    value = float(raw)
    return value if math.isfinite(value) and low <= value <= high else None


def when(raw: Any) -> float | None:
    """A wall-clock time (seconds since 1970, up to the year 2242)."""
    return number(raw, 0.0, MAX_TIME)


def seconds(raw: Any) -> float | None:
    """A duration: a window or a fetch, up to ten years."""
    return number(raw, 0.0, MAX_SECONDS)


def count(raw: Any) -> int | None:
    """A count, a size or a process id: an ``int`` in ``[0, 2**53]``."""
    return raw if type(raw) is int and 0 <= raw <= MAX_COUNT else None


def text(raw: Any, optional: bool = True) -> bool:
    """Whether ``raw`` is a ``str`` (or ``None``, when ``optional``)."""
    return type(raw) is str or (optional and raw is None)
