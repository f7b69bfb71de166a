"""memcached's ``exptime``: how a TTL in seconds is sent on the wire.

A module of its own because both :mod:`service.store` (every write) and
:mod:`service.chunks` (the pieces of a large value, which outlive their manifest) need the
same rule, and the store imports the chunks.
"""

from __future__ import annotations

import math
import time

THIRTY_DAYS = 30 * 24 * 3600
"""memcached reads an ``exptime`` above this as an absolute Unix time, not a TTL."""


def expire_time(ttl: float | None) -> int:
    """memcached's ``exptime`` for a TTL in seconds.

    ``None`` or 0 means never; a negative TTL means already expired (memcached stores
    the item and never returns it, like a cachelib backend given a negative timeout);
    anything over 30 days must be sent as an absolute Unix time (memcached's rule).
    """
    if not ttl:
        return 0
    if ttl < 0:
        return -1
    seconds = math.ceil(ttl)
    return seconds if seconds <= THIRTY_DAYS else int(time.time()) + seconds
