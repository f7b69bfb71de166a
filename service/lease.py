"""The fleet-wide lease that makes one worker (of every worker on every host) fetch a key.

A lease is a memcached item ``lease\\0<key>`` created with ``add`` (which fails when it
exists), holding an owner token ``host:pid:random`` (the random part makes it unique; the
host and pid tell an operator who holds it, see :func:`holder_of`), expiring after
``lock_lease`` seconds unless its live holder renews it. Only the owner releases it: it
reads the item with ``gets``, checks the token, and deletes it with a CAS write, so a
holder whose lease lapsed and was taken by another can never release the new holder's
lease.

memcached calls this kind of lock "loose": the lease item can be evicted, or lost with its
server. So the lease is an efficiency guarantee, not a correctness one: fetches must be
idempotent, the final write is fenced separately (see :meth:`TwoTier.write`), and every
contended, lost or expired lease is counted in ``cache_lease_total``.

The decisions (when to renew, how long to wait between polls) are pure functions at the
top of this module, tested with a fake clock; :class:`Leases` does the I/O.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import metrics
from .logs import event
from .store import MISS, Store

log = logging.getLogger(__name__)


def lease_key(key: str) -> str:
    return f"lease\x00{key}"


def new_token(host: str | None = None, pid: int | None = None) -> str:
    """A unique owner token that also names its holder: ``host:pid:random``."""
    host = (host or socket.gethostname()).replace(":", "_")
    return f"{host}:{os.getpid() if pid is None else pid}:{os.urandom(12).hex()}"


def holder_of(token: object) -> dict[str, object] | None:
    """``{"host", "pid"}`` of a lease token, or ``None`` when it does not name one (an
    older release wrote a bare random token, or the value is not ours)."""
    if not isinstance(token, str):
        return None
    host, _, rest = token.partition(":")
    pid, _, unique = rest.partition(":")
    if not host or not pid.isdigit() or not unique:
        return None
    return {"host": host, "pid": int(pid)}


def renew_every(lock_lease: float) -> float:
    """A holder renews at a third of the lease: two renewals can fail before it lapses."""
    return max(0.05, lock_lease / 3.0)


def item_lifetime(lock_lease: float) -> float:
    """The expiry to send memcached so that a lease lives at least ``lock_lease``.

    memcached expires items on its whole-second clock tick: an item set with exptime N
    lives between N-1 and N seconds. One more second keeps a renewed lease alive until
    the holder's next renewal even for short leases.
    """
    return float(math.ceil(lock_lease) + 1)


@dataclass(frozen=True)
class Lease:
    key: str
    token: str


# A lease item's value is ``<token>@<deadline>``: the deadline (wall clock, whole seconds)
# is renewed with it. A value that names no deadline, or one past it by more than this
# (clock skew between hosts), is dead whatever memcached's expiry says: an item written
# without an expiry, by accident or on purpose, must not block a key forever.
SKEW = 2.0


def lease_value(token: str, deadline: float) -> str:
    return f"{token}@{math.ceil(deadline)}"


def owner_of(value: object) -> str | None:
    """The token in a lease item's value, or ``None`` for anything else."""
    if not isinstance(value, str):
        return None
    token, at, deadline = value.rpartition("@")
    return token if at and token and deadline.isdigit() else None


def alive(value: object, now: float) -> bool:
    """Whether a lease item's value is a lease still within its own deadline."""
    if owner_of(value) is None:
        return False
    return now <= int(str(value).rpartition("@")[2]) + SKEW


class Leases:
    """Acquire, renew and release leases in memcached.

    :param store: the memcached store.
    :param lock_lease: seconds a lease lives unless renewed.
    :param clock: wall clock for the deadline in each lease's value.
    """

    def __init__(self, store: Store, lock_lease: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.lock_lease = lock_lease
        self.expiry = item_lifetime(lock_lease)
        self.clock = clock

    def acquire(self, key: str) -> Lease | None:
        """Take the lease of ``key``; ``None`` when somebody holds it.

        :raises CacheUnavailable: memcached could not be asked; the caller decides
            whether to fetch without a lease.
        """
        token = new_token()
        value = lease_value(token, self.clock() + self.lock_lease)
        if self.store.add(lease_key(key), value, self.expiry):
            metrics.lease_total.labels("acquired").inc()
            return Lease(key, token)
        current = self.store.get(lease_key(key))
        if current is not MISS and not alive(current, self.clock()):
            # Not a live lease (garbage, or past its own deadline): remove exactly that
            # item (compare-and-delete) and try once more.
            metrics.lease_total.labels("dead_removed").inc()
            if self.store.delete_if(lease_key(key), current) and self.store.add(
                    lease_key(key), value, self.expiry):
                metrics.lease_total.labels("acquired").inc()
                return Lease(key, token)
        metrics.lease_total.labels("contended").inc()
        return None

    def renew(self, lease: Lease) -> bool:
        """Extend our lease; ``False`` (counted as lost) when it is no longer ours.

        :raises CacheUnavailable: memcached could not be asked.
        """
        current, cas = self.store.gets(lease_key(lease.key))
        if owner_of(current) == lease.token and cas is not None:
            value = lease_value(lease.token, self.clock() + self.lock_lease)
            if self.store.cas(lease_key(lease.key), value, cas, self.expiry):
                return True
        metrics.lease_total.labels("lost").inc()
        event(log, logging.WARNING, "lease_lost", "lease lost while fetching", key=lease.key)
        return False

    def release(self, lease: Lease) -> bool:
        """Give the lease back, only if it is still ours (token check, then CAS delete).

        :raises CacheUnavailable: memcached could not be asked (the lease then lapses
            by itself after ``lock_lease``).
        """
        current = self.store.get(lease_key(lease.key))
        if owner_of(current) == lease.token and self.store.delete_if(
                lease_key(lease.key), current):
            metrics.lease_total.labels("released").inc()
            return True
        metrics.lease_total.labels("expired").inc()
        return False

    def holder(self, key: str) -> str | None:
        """The token of the current live holder, or ``None`` when nobody holds the lease.

        :raises CacheUnavailable: memcached could not be asked.
        """
        value = self.store.get(lease_key(key))
        return owner_of(value) if alive(value, self.clock()) else None
