"""Claims: which one worker of the fleet computes a key, on memcached's own items.

There are two kinds of claim, and both are judged by the server alone (its TTL and its
CAS), never by comparing two hosts' clocks:

* **A cold claim is the entry's own item.** ``mg <key> v c t N<ttl>`` on a missing key
  creates an empty item on the key's server and hands exactly one caller the win; every
  other caller sees the empty item and waits for it to be replaced. The item's CAS is the
  fence: the holder writes with ``ms … C<cas>``, and an invalidation (a delete) in
  between makes that write fail (``NF``) instead of storing the old value. If the holder
  dies the empty item expires after ``lock_lease`` and the next reader's ``mg`` wins.
* **A refresh claim is a small lease item beside an existing entry** (``lease`` family,
  on the entry's server), taken with ``ms … ME`` (add): an entry that is stale or usable
  only on error stays where it is, served meanwhile. The fence is the CAS of the entry
  the reader saw, so a refresh that finishes after an invalidation or a newer write is
  dropped (``NF``/``EX``). Why not memcached's ``R`` recache flag for this: a win handed
  out by ``R`` has no expiry of its own, so a winner that dies leaves the item won (and
  never refreshed) until it expires; the lease item lapses after ``lock_lease``.

Either claim is renewed by its live holder at a third of ``lock_lease``, given back only
by its owner (compare-and-delete on its CAS), and, when the fetch fails or its answer may
not be stored, *replaced in one write* by a record that tells the waiters why: an error
record (they answer the failure, or their stale copy, at once) or a pass record (they
compute for themselves at once, and the key is not coalesced for ``pass_ttl``). So no
waiter ever finds the claim gone without its reason.

memcached calls such locks loose (an item can be evicted, or lost with its server): they
save origin fetches; correctness comes from the fenced write alone.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

from ..errors import HTTPError, OriginError, OriginTimeout
from ..memcache.store import EMPTY, MISS, KeyValue
from ..observe import metrics
from ..observe.logs import event, key_hash

log = logging.getLogger(__name__)

FAILED = "\x00failed"
PASS = "\x00pass"


def new_token(host: str | None = None, pid: int | None = None) -> str:
    """A unique owner name that also says who holds a refresh lease: ``host:pid:random``."""
    host = (host or socket.gethostname()).replace(":", "_")
    return f"{host}:{os.getpid() if pid is None else pid}:{os.urandom(6).hex()}"


def holder_of(token: object) -> dict[str, object] | None:
    """``{"host", "pid"}`` named by a refresh lease's value, or ``None``."""
    if not isinstance(token, str):
        return None
    host, _, rest = token.partition(":")
    pid, _, unique = rest.partition(":")
    # A lease's value is read from a shared memcached: "²" is a digit to str.isdigit but
    # not to int(), and int() of thousands of digits raises. Either would be a 500.
    if not host or not (pid.isascii() and pid.isdigit()) or len(pid) > 10 or not unique:
        return None
    return {"host": host, "pid": int(pid)}


def renew_every(lock_lease: float) -> float:
    """A holder renews at a third of the lease: two renewals can fail before it lapses."""
    return max(0.05, lock_lease / 3.0)


def item_lifetime(lock_lease: float) -> float:
    """The TTL to send memcached so that a claim lives at least ``lock_lease``.

    memcached expires items on its whole-second clock tick: an item set with TTL N lives
    between N-1 and N seconds. One more second keeps a renewed claim alive until the
    holder's next renewal even for short leases.
    """
    return float(math.ceil(lock_lease) + 1)


# -- the records that replace a claim ---------------------------------------------------

def error_record(exc: HTTPError) -> dict[str, Any]:
    return {FAILED: 1, "status": exc.status, "detail": exc.detail[:500]}


def error_of(raw: Any) -> HTTPError | None:
    """The failure an error record stands for; ``None`` for anything else. Its lifetime
    is the item's TTL on the server: the record carries no time of its own."""
    if not isinstance(raw, dict) or raw.get(FAILED) != 1:
        return None
    status, detail = raw.get("status"), raw.get("detail")
    if status not in (502, 504) or not isinstance(detail, str):
        return None
    cls = OriginTimeout if status == 504 else OriginError
    return cls(f"{detail[:500]} (remembered for a few seconds)")


PASS_RECORD: dict[str, Any] = {PASS: 1}


def is_pass(raw: Any) -> bool:
    """Whether ``raw`` is a pass record: the last answer for the key was not storable, so
    readers compute for themselves (Varnish's hit-for-miss) until it expires."""
    return isinstance(raw, dict) and raw.get(PASS) == 1 and len(raw) == 1


@dataclass
class Claim:
    """This worker's right to compute ``key`` and write it.

    :param fence: the CAS the entry's item must still have when the value is written.
    :param lease_cas: a refresh claim's own lease item CAS (``None``: a cold claim, whose
        item is the entry's own).
    :param epoch: the invalidation epoch the new entry carries (see
        :meth:`service.tiers.TwoTier.epoch`).
    """

    key: str
    fence: bytes | None
    lease_cas: bytes | None = None
    epoch: str = ""

    @property
    def cold(self) -> bool:
        return self.lease_cas is None


class Leases:
    """Take, renew, give back and replace claims (see the module docstring).

    :param store: the SWR store (entries and the ``lease`` family live in it).
    :param lock_lease: seconds a claim lives unless its holder renews it.
    """

    def __init__(self, store: KeyValue, lock_lease: float) -> None:
        self.store = store
        # Refresh leases: a family of their own, each on its entry's server.
        self.leases = store.child("lease", follow=True)
        self.lock_lease = lock_lease
        self.expiry = item_lifetime(lock_lease)
        self.token = new_token()

    def acquire(self, key: str, fence: bytes | None) -> Claim | None:
        """Take the refresh lease of an existing entry whose CAS is ``fence``; ``None``
        when another worker holds it (or its last failure is still remembered there).

        :raises CacheUnavailable: memcached could not be asked.
        """
        stored = self.leases.mset(key, self.token, self.expiry, add=True)
        if not stored.ok:
            metrics.lease_total.labels("contended").inc()
            return None
        metrics.lease_total.labels("acquired").inc()
        return Claim(key, fence, stored.cas or self._cas_of(key))

    def take_over(self, key: str, fence: bytes | None, records: bool = True
                  ) -> tuple[Claim | None, Any]:
        """Take the refresh lease of ``key`` from what holds it, when that is no live
        holder: an item without expiry (none of ours: every claim and record expires),
        and with ``records`` a failure or pass record (a background refresh retrying on
        its own back-off). ``(None, what holds it)`` otherwise.

        :raises CacheUnavailable: memcached could not be asked.
        """
        got = self.leases.mget(key)
        if got.cas is None:
            return None, got.value
        record = error_of(got.value) or is_pass(got.value)
        if got.ttl != -1 and not (records and record):
            return None, got.value
        stored = self.leases.mset(key, self.token, self.expiry, cas=got.cas)
        if not stored.ok:
            return None, got.value
        metrics.lease_total.labels("acquired").inc()
        if got.ttl == -1:
            metrics.lease_total.labels("dead_removed").inc()
        return Claim(key, fence, stored.cas or self._cas_of(key)), None

    def lease_record(self, key: str) -> Any:
        """What holds ``key``'s refresh lease: the holder's name, an error or pass record,
        or :data:`MISS`.

        :raises CacheUnavailable: memcached could not be asked.
        """
        return self.leases.mget(key).value

    def renew(self, claim: Claim) -> bool:
        """Extend ``claim`` by ``lock_lease``; ``False`` (counted as lost) when it is no
        longer ours.

        :raises CacheUnavailable: memcached could not be asked.
        """
        if claim.cold:
            ok = self.store.touch_if(claim.key, claim.fence, self.expiry)
        else:
            stored = self.leases.mset(claim.key, self.token, self.expiry,
                                      cas=claim.lease_cas)
            ok = stored.ok
            if ok:
                claim.lease_cas = stored.cas or self._cas_of(claim.key)
        if not ok:
            metrics.lease_total.labels("lost").inc()
            event(log, logging.WARNING, "lease_lost",
                  f"claim on key {key_hash(claim.key)} lost while fetching: it expired or "
                  "was taken over (the fetch took longer than the lease); the answer is "
                  "stored only if nobody stored a newer one", key=claim.key)
        return ok

    def release(self, claim: Claim) -> bool:
        """Give ``claim`` back, only if it is still ours (compare-and-delete on its CAS).

        :raises CacheUnavailable: memcached could not be asked (it lapses by itself).
        """
        if claim.cold:
            code = self.store.mdelete(claim.key, claim.fence)
        else:
            code = self.leases.mdelete(claim.key, claim.lease_cas)
        metrics.lease_total.labels("released" if code == "HD" else "expired").inc()
        return code == "HD"

    def replace(self, claim: Claim, record: dict[str, Any], ttl: float) -> bool:
        """Replace ``claim``, if still ours, by ``record`` for ``ttl`` seconds (an error
        or pass record): one write, so a waiter never sees the claim gone without why.

        :raises CacheUnavailable: memcached could not be asked.
        """
        if claim.cold:
            stored = self.store.mset(claim.key, record, ttl, cas=claim.fence)
        else:
            stored = self.leases.mset(claim.key, record, ttl, cas=claim.lease_cas)
        return stored.ok

    def holder(self, key: str) -> str | None:
        """Who holds ``key``'s refresh lease (a cold claim names nobody: ``"?"``), or
        ``None``.

        :raises CacheUnavailable: memcached could not be asked.
        """
        value = self.lease_record(key)
        if isinstance(value, str):
            return value
        return "?" if self.store.mget(key).value is EMPTY else None

    def _cas_of(self, key: str) -> bytes | None:
        # Through a proxy without meta commands a write does not say its new CAS.
        got = self.leases.mget(key)
        return got.cas if got.value is not MISS else None
