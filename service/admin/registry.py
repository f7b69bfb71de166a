"""The fleet-wide registry of cached keys: what the admin page lists, whichever worker
answers.

memcached cannot list its keys cheaply (``lru_crawler metadump`` walks every item of a
server, and the keys are hashed when they are long, so they carry neither source nor
parameters). So the fleet writes down what it stores: every load that ends in the loader
(a cold miss, a background refresh, a periodic job, the admin's refresh) is noted here by
the worker that did it, and the worker merges its notes into a bounded set of registry
items in memcached, in the SWR namespace:

* ``registry\\0<i>``, ``i < buckets``: the keys whose hash falls in bucket ``i``, each with
  its source (or decorated function), kind, parameters, the last outcome, error, time,
  host and pid, and the stored entry's time, windows, ETag and size. Written with
  ``gets``/``cas`` (``add`` when absent), retried a few times on contention, so workers
  never overwrite each other's notes; trimmed to ``per_bucket`` records (the most recently
  written stay), and records of entries that expired are dropped.
* ``registry\\0errors`` and ``registry\\0hub``: the latest refresh failures and blocked-hub
  reports of the whole fleet, newest first.

Nothing here runs on a reader's path: :meth:`Registry.note` only updates a dict in the
worker and wakes the worker's reporter (a periodic job of its refresher, see
:meth:`service.history.History.report`), which flushes the notes; what arrives while it
flushes waits ``FLUSH_DELAY``, so a burst of loads costs one write per bucket. When
memcached cannot be asked, the notes wait (bounded) for the next flush.

How complete the listing is: see :data:`COMPLETENESS` (also in the README).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.lock

from ..errors import CacheUnavailable
from ..memcache.store import MISS, Store
from ..observe import monitor
from ..readpath.entry import MAX_TIME
from ..readpath.tiers import LocalTier
from .numbers import count, number, seconds, text, when

if TYPE_CHECKING:
    from ..readpath.entry import Entry
    from ..readpath.loader import Job

log = logging.getLogger(__name__)

BUCKETS = 64
PER_BUCKET = 64
FLUSH_DELAY = 0.25
CAS_TRIES = 5
ERRORS_KEPT = 50
HUB_KEPT = 20
# Records without a stored entry (failed first loads, invalidated keys) are kept this long.
FORGET_AFTER = 3600.0
# A registry item not written for this long expires (its entries are long gone too).
REGISTRY_TTL = 7 * 86400.0
ERRORS_KEY = "errors"
HUB_KEY = "hub"
ENTRY_FIELDS = ("sa", "w", "etag", "z", "f")

COMPLETENESS = (
    "The listing shows the keys the fleet stored through the cache (a /v1 source, a view "
    "or function decorated with @swr.cached or @swr.memoize, a periodic function), as "
    "recorded by the worker that loaded them: at most {capacity} keys ({buckets} buckets "
    "of {per_bucket}; in a full bucket the least recently loaded key is dropped first). A "
    "load appears within a second of landing. Not listed: values written with the "
    "Flask-Caching backend's cache.set, keys whose registry bucket was evicted by "
    "memcached, and the notes of a worker that died within a second of its load. Each "
    "row's state, age and lease come from memcached at the time of the request."
)

Record = dict[str, Any]


def bucket_of(key: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big") % buckets


def bucket_key(index: int) -> str:
    return f"bucket:{index}"


def kind_of(job: Job) -> str:
    """What front door a job came in by: ``source`` (``/v1``), ``view``, ``function`` or
    ``periodic``. Read from the key builder's shapes (:mod:`service.keying`)."""
    if job.key.startswith("src:"):
        return "source"
    if job.key.startswith("fn:"):
        return "function"
    if job.key == job.source:
        return "periodic"
    return "view" if job.params is not None else "function"


def valid_record(rec: Any) -> bool:
    """Registry items are data read from a shared memcached: only our exact shape counts,
    and every number within its bounds (:mod:`service.admin.numbers`). A record that
    fails is treated as absent, and dropped when its bucket is next written."""
    if not (isinstance(rec, dict) and text(rec.get("k"), False) and text(rec.get("s"), False)
            and text(rec.get("o"), False) and when(rec.get("t")) is not None):
        return False
    params = rec.get("p")
    if params is not None and not (type(params) is dict and all(
            text(k, False) and text(v, False) for k, v in params.items())):
        return False
    if not all(text(rec.get(f)) for f in ("kind", "e", "h", "etag")):
        return False
    if any(rec.get(f) is not None and count(rec.get(f)) is None for f in ("z", "pid")):
        return False
    if rec.get("f") is not None and seconds(rec["f"]) is None:
        return False
    w = rec.get("w")
    if rec.get("sa") is None:
        return w is None
    return (when(rec["sa"]) is not None and type(w) is list and len(w) == 3
            and all(seconds(x) is not None for x in w))


def valid_item(item: Any) -> bool:
    """An item of the errors or blocked-hub ring, checked like :func:`valid_record`."""
    return (isinstance(item, dict) and when(item.get("t")) is not None
            and all(text(item.get(f)) for f in ("k", "s", "o", "e", "h", "greenlet", "stack"))
            and (item.get("pid") is None or count(item.get("pid")) is not None)
            and all(item.get(f) is None or number(item.get(f), 0.0, MAX_TIME) is not None
                    for f in ("at", "seconds")))


def expired(rec: Record, now: float) -> bool:
    """The entry of ``rec`` is past its last window (so memcached dropped it), or the
    record has no entry and is old."""
    w = rec.get("w")
    if rec.get("sa") is not None and isinstance(w, list) and len(w) == 3:
        return bool(rec["sa"] + sum(w) + 60 < now)
    return bool(rec["t"] + FORGET_AFTER < now)


def merge_records(current: dict[str, Record], incoming: Iterable[Record], now: float,
                  limit: int) -> dict[str, Record]:
    """``current`` updated with ``incoming`` (newer news wins; a failed load keeps the
    entry fields of the record before it: the old entry is still stored), without expired
    records, trimmed to the ``limit`` most recently written."""
    merged = dict(current)
    for rec in incoming:
        old = merged.get(rec["k"])
        if old is not None and old["t"] > rec["t"]:
            continue
        if old is not None and rec.get("sa") is None and rec["o"] != "invalidated":
            rec = {**rec, **{f: old.get(f) for f in ENTRY_FIELDS}}
        merged[rec["k"]] = rec
    kept = [r for r in merged.values() if not expired(r, now)]
    if len(kept) > limit:
        kept = sorted(kept, key=lambda r: r["t"], reverse=True)[:limit]
    return {r["k"]: r for r in kept}


class Registry:
    """See the module docstring.

    :param store: the SWR namespace's store.
    :param local: this worker's in-process tier (the size of a value it just stored).
    :param clock: the app's wall clock.
    """

    def __init__(self, store: Store, local: LocalTier, clock: Callable[[], float],
                 buckets: int = BUCKETS, per_bucket: int = PER_BUCKET) -> None:
        self.store = store
        self.local = local
        self.clock = clock
        self.buckets = buckets
        self.per_bucket = per_bucket
        self.host = socket.gethostname()
        self._pending: dict[str, Record] = {}
        self._errors: list[Record] = []
        self._hub_sent = 0.0
        self._news = gevent.event.Event()
        self._flushing = gevent.lock.Semaphore()

    @property
    def capacity(self) -> int:
        return self.buckets * self.per_bucket

    def completeness(self) -> str:
        return COMPLETENESS.format(capacity=self.capacity, buckets=self.buckets,
                                   per_bucket=self.per_bucket)

    # -- notes from the read path (cheap: a dict update, the write comes later) ----------

    def note(self, job: Job, outcome: str, now: float, error: str | None = None,
             entry: Entry | None = None) -> None:
        """A load of ``job`` ended with ``outcome`` (and stored ``entry``, when given)."""
        rec = self._record(job.key, job.source, kind_of(job),
                           dict(job.params) if job.params is not None else None,
                           outcome, now, error)
        if entry is not None and outcome == "ok":
            w = entry.windows
            rec.update(sa=entry.stored_at, etag=entry.etag, f=entry.timing.fetch_seconds,
                       w=[w.max_age, w.stale_while_revalidate, w.stale_if_error])
        if outcome in ("error", "timeout"):
            self._errors.append({"k": job.key, "s": job.source, "o": outcome, "e": error,
                                 "t": now, "h": self.host, "pid": rec["pid"]})
            del self._errors[:-ERRORS_KEPT]
        self._pend([rec])
        self._schedule()

    def invalidated(self, records: Iterable[Record], who: str) -> None:
        """The admin deleted these keys' entries: they list as invalidated (call
        :meth:`flush` to make that visible to the fleet at once)."""
        now = self.clock()
        self._pend([self._record(r["k"], r["s"], r.get("kind", "-"), r.get("p"),
                                 "invalidated", now, f"by {who}") for r in records])

    def _record(self, key: str, source: str, kind: str, params: dict[str, Any] | None,
                outcome: str, now: float, error: str | None) -> Record:
        return {"k": key, "s": source, "kind": kind, "p": params, "o": outcome, "e": error,
                "t": now, "h": self.host, "pid": os.getpid()}

    def _pend(self, records: Iterable[Record]) -> None:
        self._pending = merge_records(self._pending, records, self.clock(), self.capacity)

    def _schedule(self) -> None:
        self._news.set()

    def wait(self, timeout: float) -> bool:
        """Wait until there are notes to flush (the reporter), at most ``timeout``."""
        news = bool(self._news.wait(timeout))
        self._news.clear()
        return news

    # -- writing to memcached ---------------------------------------------------------------

    def flush(self) -> bool:
        """Merge this worker's notes into the registry items. Never raises.

        One flush at a time: the admin's own flush waits for the reporter's, so that what
        it reads next includes every note this worker took.

        :return: whether everything was written (what was not waits for the next flush).
        """
        with self._flushing:
            return self._flush()

    def _flush(self) -> bool:
        pending, self._pending = self._pending, {}
        errors, self._errors = self._errors, []
        hub = [dict(e, h=self.host, t=e["at"], pid=os.getpid())
               for e in list(monitor.recent) if e["at"] > self._hub_sent]
        now = self.clock()
        for rec in pending.values():
            local = self.local.get(rec["k"])
            if rec.get("sa") is not None and local is not None \
                    and local.entry.stored_at == rec["sa"]:
                rec["z"] = len(local.blob)
        groups: dict[int, list[Record]] = {}
        for rec in pending.values():
            groups.setdefault(bucket_of(rec["k"], self.buckets), []).append(rec)
        left: list[Record] = []
        try:
            for index in list(groups):
                recs = groups[index]
                if not self._cas_merge(bucket_key(index), self._bucket_update(recs, now)):
                    left.extend(recs)
                del groups[index]
            if errors:
                if not self._cas_merge(ERRORS_KEY, lambda cur: _ring(cur, errors, ERRORS_KEPT)):
                    self._errors[:0] = errors
                errors = []
            if hub and self._cas_merge(HUB_KEY, lambda cur: _ring(cur, hub, HUB_KEPT)):
                self._hub_sent = max(e["at"] for e in hub)
        except CacheUnavailable as exc:
            log.info("registry: memcached unavailable, notes kept for later: %s", exc)
            left.extend(rec for recs in groups.values() for rec in recs)
            self._errors[:0] = errors
        if left:
            self._pend(left)
            return False
        return True

    def _bucket_update(self, recs: list[Record], now: float) -> Callable[[Any], Any]:
        def update(current: Any) -> Any:
            return {"v": 1, "r": merge_records(self._bucket(current), recs, now,
                                               self.per_bucket)}

        return update

    def _bucket(self, value: Any) -> dict[str, Record]:
        if not isinstance(value, dict) or value.get("v") != 1 \
                or not isinstance(value.get("r"), dict):
            return {}
        return {k: r for k, r in value["r"].items() if valid_record(r) and r["k"] == k}

    def _cas_merge(self, key: str, update: Callable[[Any], Any]) -> bool:
        """Read-modify-write ``key`` fenced by CAS; ``False`` after ``CAS_TRIES`` losses."""
        for attempt in range(CAS_TRIES):
            current, token = self.store.gets(key)
            value = update(None if current is MISS else current)
            if token is not None:
                stored = self.store.cas(key, value, token, REGISTRY_TTL)
                if stored is None:
                    stored = self.store.add(key, value, REGISTRY_TTL)
            else:
                stored = self.store.add(key, value, REGISTRY_TTL)
            if stored:
                return True
            # Another worker wrote between our gets and cas: read theirs and merge again.
            gevent.sleep(0.002 * (attempt + 1) * (0.5 + random.random()))
        log.info("registry: %s stayed contended after %s tries", key, CAS_TRIES)
        return False

    # -- reading (the admin) -------------------------------------------------------------------

    def records(self) -> list[Record]:
        """Every record of the fleet.

        :raises CacheUnavailable: memcached could not be asked.
        """
        found = self.store.get_many(bucket_key(i) for i in range(self.buckets))
        out: dict[str, Record] = {}
        for value in found.values():
            out.update(self._bucket(value))
        return list(out.values())

    def errors(self) -> list[Record]:
        """The latest refresh failures of the fleet, newest first.

        :raises CacheUnavailable: memcached could not be asked.
        """
        return _items(_ring(self.store.get(ERRORS_KEY), [], ERRORS_KEPT))

    def hub_events(self) -> list[Record]:
        """The latest blocked-hub reports of the fleet, newest first.

        :raises CacheUnavailable: memcached could not be asked.
        """
        return _items(_ring(self.store.get(HUB_KEY), [], HUB_KEPT))


def _when(item: Record) -> float:
    return float(item["t"])


def _ring(current: Any, new: list[Record], keep: int) -> dict[str, Any]:
    """A ring of the ``keep`` newest items (``{"items": [...]}``, newest first)."""
    old = [i for i in _items(current) if valid_item(i)]
    return {"items": sorted(new + old, key=_when, reverse=True)[:keep]}


def _items(value: Any) -> list[Record]:
    items = value.get("items") if isinstance(value, dict) else None
    return [i for i in items if valid_item(i)] if isinstance(items, list) else []
