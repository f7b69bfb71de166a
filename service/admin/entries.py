"""The admin's entries: the fleet's keys with their live state, and the actions on them.

The list comes from the fleet-wide :class:`~service.registry.Registry` (the same for
whichever worker answers). Each row's live facts come from memcached at the time of the
request, without reading the (possibly large) values: one pipelined meta ``mg <key> s t``
per server says whether the entry is there, its size and how long memcached keeps it; the
registry's record of the stored entry (time, windows, ETag) gives its state and age. When
the two disagree (the entry was stored by a load whose note has not landed yet), that
entry is read for real. Leases are read with one ``get_many``; their token names the
holder (:func:`service.lease.holder_of`).

Actions, each for exactly one entry or one source:

* invalidate an entry: delete it from memcached, from this worker's in-process tier
  (other workers drop their copy within ``l1_ttl``) and its remembered failure; its
  record then lists as ``invalidated`` until it is loaded again;
* invalidate a source: for a ``/v1`` source, bump its generation (every key of the
  source changes, in every worker within ``l1_ttl``) and delete the listed entries; for a
  decorated view or function, delete every entry the registry lists for it;
* refresh an entry: a worker that has served the key knows how to recompute it (the job
  of a decorated view or function is a closure in that worker) and schedules a background
  refresh; any other worker marks the stored entry stale instead (a CAS rewrite of its
  time), so that the next read of it, by any worker, serves it and refreshes it in the
  background. ``/v1`` entries can be recomputed by every worker.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterable
from operator import methodcaller
from typing import Any

import gevent
import orjson

from ..errors import CacheUnavailable, CodecError
from ..flask.state import AppState
from ..memcache.clients import borrow
from ..memcache.keys import digest
from ..memcache.store import MISS
from ..readpath.entry import Entry
from ..readpath.freshness import Timing, Windows, state
from ..readpath.lease import holder_of
from .install import registry_of
from .registry import Record, kind_of

MAX_LIMIT = 1000
# How far memcached's expiry may be from the registry's idea of it before the registry's
# record is taken to describe an older entry (memcached counts whole seconds).
TTL_SLACK = 2.5
STATES = ("fresh", "stale", "error_only", "loading", "gone", "invalidated")


@dataclasses.dataclass(frozen=True)
class Filters:
    source: str | None = None
    state: str | None = None
    text: str | None = None
    offset: int = 0
    limit: int = 100

    @classmethod
    def parse(cls, args: dict[str, str]) -> Filters:
        """:raises ValueError: a bad number or state (the message says which)."""
        st = args.get("state") or None
        if st is not None and st not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        try:
            offset = max(0, int(args.get("offset", 0)))
            limit = min(MAX_LIMIT, max(1, int(args.get("limit", 100))))
        except ValueError:
            raise ValueError("offset and limit must be integers") from None
        return cls(args.get("source") or None, st, (args.get("q") or "").lower() or None,
                   offset, limit)


def records(st: AppState) -> tuple[list[Record], str]:
    """The fleet's records (after flushing this worker's own notes) and their scope;
    this worker's ledger when memcached cannot be asked."""
    registry = registry_of(st)
    if registry is not None:
        registry.flush()
        try:
            return registry.records(), "fleet"
        except CacheUnavailable:
            pass
    out = []
    for key, known in st.ledger.items():
        out.append({"k": key, "s": known.source, "kind": kind_of(known.job),
                    "p": known.params, "o": known.last_outcome or "-",
                    "e": known.last_error, "t": known.last_refresh_at or 0.0})
    return out, "this worker (memcached unavailable)"


def listing(st: AppState, filters: Filters) -> dict[str, Any]:
    """``GET /admin/api/entries``."""
    recs, scope = records(st)
    now = st.clock()
    if filters.source:
        recs = [r for r in recs if r["s"] == filters.source]
    if filters.text:
        recs = [r for r in recs if filters.text in _haystack(r)]
    rows = sorted(_rows(st, recs, now), key=lambda r: (r["source"], r["key"]))
    if filters.state:
        rows = [r for r in rows if r["state"] == filters.state]
    registry = registry_of(st)
    return {
        "scope": scope, "total": len(rows), "offset": filters.offset, "limit": filters.limit,
        "entries": rows[filters.offset:filters.offset + filters.limit],
        "sources": sorted({r["s"] for r in recs}),
        "completeness": registry.completeness() if registry is not None else "",
        "generated_at": now, "answered_by": answered_by(),
    }


def describe(st: AppState, rec: Record) -> dict[str, Any]:
    """One listed entry's row, as :func:`listing` shows it (``flask swr show``)."""
    return _rows(st, [rec], st.clock())[0]


def answered_by() -> dict[str, Any]:
    """The worker answering this request."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _haystack(rec: Record) -> str:
    return " ".join([rec["k"], rec["s"], orjson.dumps(rec.get("p")).decode(),
                     str(rec.get("e") or "")]).lower()


def _rows(st: AppState, recs: list[Record], now: float) -> list[dict[str, Any]]:
    keys = [r["k"] for r in recs]
    try:
        meta = probe(st, keys)
        leases = st.leases.leases.get_many(keys)
        unsure = [r["k"] for r in recs if meta.get(r["k"]) is not None
                  and not _agrees(r, meta[r["k"]][1], now)]
        read = st.store.get_many(unsure) if unsure else {}
        reachable = True
    except CacheUnavailable:
        meta, leases, read, reachable = {}, {}, {}, False
    rows = []
    for rec in recs:
        key = rec["k"]
        local = st.tiers.local.get(key)
        entry = _entry_of(rec) if key not in read else _decode(read[key])
        size = rec.get("z")
        if key in read and entry is not None:
            size = meta[key][0]
        in_mc = key in meta
        if not in_mc and local is not None and not reachable:
            entry, size = local.entry, len(local.blob)
        lease = leases.get(key)
        if in_mc and entry is not None:
            status = state(entry.timing, now).value
        elif rec["o"] == "invalidated":
            status = "invalidated"
        else:
            status = "loading" if lease is not None else "gone"
        row: dict[str, Any] = {
            "id": digest(key), "key": key, "source": rec["s"], "kind": rec.get("kind", "-"),
            "params": rec.get("p"), "state": status,
            "tiers": (["memcached"] if in_mc else []) + (["l1"] if local is not None else []),
            "size": size, "last_refresh": rec["o"], "last_refresh_at": rec["t"],
            "last_error": rec.get("e"),
            "last_by": {"host": rec.get("h"), "pid": rec.get("pid")} if rec.get("h") else None,
            "lease_holder": (holder_of(lease) or {"host": "?", "pid": None})
            if lease is not None else None,
            "in_memcached": in_mc,
        }
        if entry is not None and status not in ("gone", "invalidated"):
            t = entry.timing
            row.update(age=round(t.age(now), 3), stored_at=t.stored_at,
                       fresh_until=t.fresh_until, stale_until=t.stale_until,
                       error_until=t.error_until, etag=entry.etag)
        rows.append(row)
    return rows


def _entry_of(rec: Record) -> Entry | None:
    """The stored entry as the registry recorded it (without its value)."""
    w = rec.get("w")
    if rec.get("sa") is None or not isinstance(w, list) or len(w) != 3:
        return None
    try:
        timing = Timing(float(rec["sa"]), Windows(*map(float, w)), float(rec.get("f") or 0))
    except (TypeError, ValueError):
        return None
    return Entry(None, timing, str(rec.get("etag") or ""))


def _agrees(rec: Record, ttl: int, now: float) -> bool:
    entry = _entry_of(rec)
    if entry is None:
        return False
    return ttl < 0 or abs(now + ttl - entry.timing.error_until) <= TTL_SLACK


def _decode(raw: Any) -> Entry | None:
    try:
        entry = Entry.from_wire(raw)
    except CodecError:
        return None
    return dataclasses.replace(entry, value=None)


def probe(st: AppState, keys: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{key: (size in bytes, seconds memcached keeps it)}`` for the keys memcached has,
    without reading values: pipelined meta ``mg <key> s t`` commands, one round trip per
    server.

    :raises CacheUnavailable: memcached could not be asked.
    """
    by_mkey = {st.store.key(k): k for k in keys}
    found: dict[str, tuple[int, int]] = {}
    with borrow(st.pool) as conn:
        for server, mkeys in conn.by_server(by_mkey).items():
            for start in range(0, len(mkeys), 500):
                group = mkeys[start:start + 500]
                command = b"\r\n".join(b"mg " + k + b" s t" for k in group) + b"\r\nmn"
                answer: bytes = conn.call(server, "mg", methodcaller(
                    "raw_command", command, b"MN\r\n"))
                lines = answer.split(b"\r\n")[:len(group)]
                for mkey, line in zip(group, lines, strict=False):
                    flags = dict((f[:1], f[1:]) for f in line.split()[1:])
                    if line.startswith(b"HD") and flags.get(b"s", b"").isdigit():
                        found[by_mkey[mkey]] = (int(flags[b"s"]), int(flags.get(b"t", -1)))
    return found


# -- actions -------------------------------------------------------------------------------

def find(st: AppState, entry_id: str) -> Record | None:
    """The record of the entry whose id (:func:`service.keys.digest` of its key) is given."""
    for rec in records(st)[0]:
        if digest(rec["k"]) == entry_id:
            return rec
    return None


def invalidate(st: AppState, recs: list[Record], who: str) -> list[str]:
    """Delete these entries everywhere we can reach; they then list as invalidated.

    :raises CacheUnavailable: memcached could not be asked (this worker's copies are gone).
    """
    keys = [r["k"] for r in recs]
    for key in keys:
        st.tiers.local.delete(key)
        st.ledger.forget(key)
    now = st.clock()
    for key in keys:
        st.tiers.forget_shared(key, now)
        st.loader.forget(key)
    registry = registry_of(st)
    if registry is not None:
        registry.invalidated(recs, who)
        registry.flush()
    return keys


def refresh(st: AppState, rec: Record, job: Any) -> dict[str, Any]:
    """Refresh one entry now (``job`` known here), or mark it stale for the fleet."""
    if job is not None:
        return {"scheduled": st.region.refresh_later(job), "how": "refreshing in the "
                "background in this worker"}
    key = rec["k"]
    for _attempt in range(3):
        raw, token = st.store.gets(key)
        if raw is MISS or token is None:
            return {"scheduled": False, "how": "nothing is stored: the next read loads it"}
        try:
            entry = Entry.from_wire(raw)
        except CodecError:
            return {"scheduled": False, "how": "what is stored is not an entry"}
        now = st.clock()
        shift = max(0.0, entry.timing.fresh_until - now)
        timing = dataclasses.replace(entry.timing, stored_at=entry.stored_at - shift)
        stale = dataclasses.replace(entry, timing=timing)
        if st.store.cas(key, stale.to_wire(), token, max(1.0, timing.error_until - now)):
            st.tiers.local.delete(key)
            return {"scheduled": False, "marked_stale": True,
                    "how": "no worker that served this key answered; the entry is marked "
                           "stale: the next read, by any worker, refreshes it in the "
                           "background"}
        gevent.sleep(0.01)
    return {"scheduled": False, "how": "the entry kept changing; try again"}
