"""The admin's actions on a source or an entry, whoever asks: the API (routes) or the CLI.

Each takes the app's state and what was named, does the action fleet-wide through
:mod:`service.admin.entries`, and answers what it did as a dict; a name or parameters
that match nothing raise :class:`~service.errors.NotFound` (a bad request
:class:`~service.errors.BadRequest`), memcached out of reach
:class:`~service.errors.Unavailable`. The caller writes the audit line: it knows who asked.
"""

from __future__ import annotations

from typing import Any

from ..errors import BadRequest, CacheUnavailable, NotFound, Unavailable
from ..flask.state import AppState
from . import entries as adminentries
from .registry import Record


def configured(st: AppState) -> dict[str, Any]:
    """The app's ``/v1`` sources by name (none in an app without the service's views)."""
    found: dict[str, Any] = st.extra.get("sources", {})
    return found


def job_for(st: AppState, source: Any, params: dict[str, str]) -> Any:
    """The job of a ``/v1`` source's entry, as the service's views build it (they set the
    hook; an app without them has no sources to refresh)."""
    if st.source_job is None:
        raise NotFound("this app serves no /v1 sources")
    return st.source_job(st, source, params)


def record(st: AppState, entry_id: str) -> Record:
    """The listed entry whose id is ``entry_id``."""
    rec = adminentries.find(st, entry_id)
    if rec is None:
        raise NotFound(f"no entry with id {entry_id!r} is listed")
    return rec


def listed(st: AppState, name: str, params: dict[str, str] | None) -> list[Record]:
    """The records of source ``name`` (with exactly ``params``, when given)."""
    recs = [r for r in adminentries.records(st)[0] if r["s"] == name]
    return [r for r in recs if params is None or (r.get("p") or {}) == params]


def invalidate(st: AppState, recs: list[Record], who: str) -> None:
    try:
        adminentries.invalidate(st, recs, who)
    except CacheUnavailable as exc:
        raise Unavailable(f"memcached is needed to invalidate: {exc}") from exc


def invalidate_source(st: AppState, name: str, params: dict[str, str], who: str
                      ) -> dict[str, Any]:
    """One entry (with params), or every entry of the source (without). The answer has
    ``scope`` (``entry`` or ``source``), ``entries`` (how many) and ``key`` (the one
    entry's key, for the audit line)."""
    source = configured(st).get(name)
    try:
        if source is not None and params:
            job = job_for(st, source, source.check(params))
            recs = [r for r in listed(st, name, None) if r["k"] == job.key] or [
                {"k": job.key, "s": name, "kind": "source", "p": job.params}]
            invalidate(st, recs, who)
            scope = "entry"
        else:
            recs = listed(st, name, params or None)
            if source is None and not recs:
                raise NotFound(f"no source, view or function named {name!r} has entries")
            if source is not None:
                st.generations.bump(name)
            invalidate(st, recs, who)
            scope = "source" if not params else "entry"
    except CacheUnavailable as exc:
        raise Unavailable(f"memcached is needed to invalidate: {exc}") from exc
    return {"scope": scope, "entries": len(recs),
            "key": recs[0]["k"] if scope == "entry" else None}


def refresh_entry(st: AppState, rec: Record) -> dict[str, Any]:
    """Refresh one listed entry: now, where this process knows its job; else marked stale
    for the fleet (see :func:`service.admin.entries.refresh`)."""
    known = st.ledger.get(rec["k"])
    job = known.job if known is not None else None
    source = configured(st).get(rec["s"])
    if job is None and rec.get("kind") == "source" and source is not None \
            and isinstance(rec.get("p"), dict):
        candidate = job_for(st, source, rec["p"])
        job = candidate if candidate.key == rec["k"] else None
    try:
        return adminentries.refresh(st, rec, job)
    except CacheUnavailable as exc:
        raise Unavailable(f"memcached is needed to refresh: {exc}") from exc


def refresh_source(st: AppState, name: str, params: dict[str, str]) -> dict[str, Any]:
    """Refresh the entry of ``name`` with ``params``: a ``/v1`` source's is scheduled here;
    a view's or function's must be listed exactly once. The answer has ``key``."""
    source = configured(st).get(name)
    if source is not None:
        if source.kind == "composite":
            raise BadRequest("refresh the parts of a composite source one by one")
        job = job_for(st, source, source.check(params))
        return {"scheduled": st.region.refresh_later(job), "key": job.key}
    recs = listed(st, name, params)
    if len(recs) != 1:
        raise NotFound(f"{len(recs)} entries of {name!r} have exactly these parameters; "
                       "refresh one by its id (POST /admin/api/entries/ID/refresh)")
    return {**refresh_entry(st, recs[0]), "key": recs[0]["k"]}
