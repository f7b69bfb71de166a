"""An offline demo source that does real work: the shipped ``[sources.primes]``.

``curl -i localhost:8000/v1/primes`` computes the primes below ``limit`` with a
pure-Python sieve (about a second for the default: CPU-bound, which is why the
demo runs it with ``executor = "process"``); the second ``curl`` is a HIT.
"""

from __future__ import annotations

import math
import time
from typing import Any

DEFAULT_LIMIT = 2_000_000
MAX_LIMIT = 20_000_000


def primes(limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """How many primes are below ``limit``, the largest of them, and how long it took.

    :param limit: a query parameter; its annotation makes ``?limit=abc`` the caller's 400.
    :raises ValueError: ``limit`` is not between 2 and 20,000,000.
    """
    n = int(limit)
    if not 2 <= n <= MAX_LIMIT:
        raise ValueError(f"limit must be between 2 and {MAX_LIMIT}, got {n}")
    started = time.perf_counter()
    sieve = bytearray([1]) * n
    sieve[0:2] = b"\x00\x00"
    # A plain Python loop on purpose: the demo should cost real CPU time (about a
    # second for the default limit), which is what the "process" executor is for.
    for i in range(2, math.isqrt(n - 1) + 1):
        if sieve[i]:
            for multiple in range(i * i, n, i):
                sieve[multiple] = 0
    count = sieve.count(1)
    largest = sieve.rindex(1) if count else None
    return {
        "limit": n, "count": count, "largest": largest,
        "computed_in_seconds": round(time.perf_counter() - started, 4),
    }
