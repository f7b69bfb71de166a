"""The admin's commands in ``flask swr`` (the group is :mod:`service.flask.cli`'s).

The same functions as the admin API (:mod:`service.admin.stats`, ``entries``,
``actions``), called in this process with the app's own config: it talks to memcached as
the workers do, so what it lists and does is the fleet's, and it needs no admin token
(whoever can read the config can reach memcached anyway). Every action is logged as an
``admin`` event, like the API's, with ``who=cli`` and the user (on the terminal with
``-v``), and an invalidation is recorded on the entry for the fleet ("by cli (USER)").

Runs outside gunicorn, unpatched by gevent: a command that loads (``warm``, ``refresh``
of a ``/v1`` source) does it before it returns, and stops what it started.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from ..errors import HTTPError
from ..flask.cli import emit, fleet_command, json_option, params_of, swr, table
from ..flask.state import AppState
from ..memcache.keys import digest
from ..observe.logs import event
from ..readpath.region import Result
from . import actions
from . import entries as adminentries
from . import stats as adminstats
from .install import install, registry_of

T = TypeVar("T")
log = logging.getLogger(__name__)
WHO = "cli"
params_argument = click.argument("params", nargs=-1, metavar="[NAME=VALUE]...")


def _user() -> str:
    """Who runs the command (a uid without a name in a container is its number)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _who() -> str:
    return f"{WHO} ({_user()})"


def _audit(message: str, **fields: Any) -> None:
    # On this terminal with -v; the fleet's own record of an invalidation is the
    # registry's ("by cli (USER)" on the entry), written by the action itself.
    event(log, logging.INFO, "admin", message, who=WHO, remote=_user(), **fields)


def _prepared(st: AppState) -> AppState:
    install(st)  # an app that mounted the admin has it already; the CLI reads through it
    return st


def _answer(fn: Callable[[], T]) -> T:
    """An action's answer, or its refusal as the command's failure (status 1)."""
    try:
        return fn()
    except HTTPError as exc:
        raise click.ClickException(exc.detail) from None


@contextlib.contextmanager
def _settled(st: AppState) -> Iterator[None]:
    """What the command starts in this process finishes before it returns: a refresh it
    scheduled runs to its end (bounded by the fetch timeout) and the refresher it started
    stops; the registry hears of its loads."""
    ours = not st.refresher.started
    try:
        yield
    finally:
        st.refresher.join(timeout=st.settings.refresh.fetch_timeout + 1.0)
        if ours:
            st.refresher.stop()
        registry = registry_of(st)
        if registry is not None:
            registry.flush()


def _count(n: int, noun: str) -> str:
    """``1 entry``, ``2 entries``."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun[:-1]}ies" if noun.endswith("y") else f"{n} {noun}s"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}s"


# -- reading -----------------------------------------------------------------------------------

@swr.command("stats", short_help="memcached's servers, this host's counts, the fleet's failures.")
@json_option
@fleet_command
def stats(st: AppState, as_json: bool) -> None:
    """Memcached servers, per-source counters of this host, the fleet's recent errors.

    Per-source counts are this host's workers' when PROMETHEUS_MULTIPROC_DIR names their
    directory (service.gunicorn.conf sets it in the master); else this process's own."""
    out = adminstats.collect(_prepared(st))

    def human(data: dict[str, Any]) -> str:
        parts = ["memcached servers:", table(
            [(s["server"], "up" if s.get("up") else "DOWN", s.get("version"),
              s.get("curr_items"), _ratio(s.get("memory_used")), s.get("evictions"),
              _ratio(s.get("hit_ratio")), s.get("error")) for s in data["servers"]],
            ("server", "state", "version", "items", "memory", "evictions", "hit ratio",
             "error"))]
        rows = [(name, int(info["requests"]["total"]), _ratio(info["ratios"]["hit"]),
                 _ratio(info["ratios"]["stale"]), _ratio(info["ratios"]["miss"]),
                 sum(int(v) for v in info["refreshes"].values()))
                for name, info in data["sources"].items()]
        scope = data["scope"]["sources"] if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else (
            "this command only: set PROMETHEUS_MULTIPROC_DIR to the workers' directory "
            "for this host's counts")
        parts += ["", f"sources, {scope}:",
                  table(rows, ("source", "requests", "hit", "stale", "miss", "fetches"))
                  if rows else "  no requests counted"]
        errors = data.get("errors") or []
        parts += ["", f"recent refresh failures, {data['scope']['errors']}:"]
        parts += [table([(time.strftime("%H:%M:%S", time.localtime(e.get("t", 0))),
                          e.get("s"), e.get("e")) for e in errors[:10]],
                        ("time", "source", "error"))] if errors else ["  none"]
        return "\n".join(parts)

    emit(out, as_json, human)


@swr.command("entries", short_help="List the fleet's entries and their state.")
@click.option("--source", help="Only this source, view or function.")
@click.option("--state", type=click.Choice(adminentries.STATES),
              help="Only entries in this state.")
@click.option("-q", "text", help="Only entries whose key, source, parameters or error "
              "contain this text.")
@click.option("--offset", type=int, default=0, show_default=True)
@click.option("--limit", type=int, default=100, show_default=True,
              help=f"At most this many (up to {adminentries.MAX_LIMIT}).")
@json_option
@fleet_command
def entries(st: AppState, source: str | None, state: str | None, text: str | None,
            offset: int, limit: int, as_json: bool) -> None:
    """The fleet's entries with their live state (the admin API's filters)."""
    args = {"source": source or "", "state": state or "", "q": text or "",
            "offset": str(offset), "limit": str(limit)}
    try:
        filters = adminentries.Filters.parse(args)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    out = adminentries.listing(_prepared(st), filters)

    def human(data: dict[str, Any]) -> str:
        rows = [(e["id"][:12], e["source"], _params(e["params"]), e["state"], _age(e.get("age")),
                 "+".join(e["tiers"]), e["last_refresh"]) for e in data["entries"]]
        shown = f"{len(rows)} of {_count(data['total'], 'entry')} ({data['scope']})"
        if not rows:
            return shown
        return table(rows, ("id", "source", "params", "state", "age", "tiers",
                            "last refresh")) + "\n" + shown

    emit(out, as_json, human)


@swr.command("show", short_help="One entry, by its key or its id.")
@click.argument("key_or_id")
@json_option
@fleet_command
def show(st: AppState, key_or_id: str, as_json: bool) -> None:
    """One entry, by its key or its id (a prefix of the id is enough when unique)."""
    recs, _scope = adminentries.records(_prepared(st))
    found = [r for r in recs if r["k"] == key_or_id or digest(r["k"]).startswith(key_or_id)]
    if len(found) != 1:
        what = "no entry" if not found else f"{len(found)} entries"
        raise click.ClickException(f"{what} listed with key or id {key_or_id!r} "
                                   "(flask swr entries lists them)")
    row = adminentries.describe(st, found[0])

    now = st.clock()

    def human(data: dict[str, Any]) -> str:
        return "\n".join(f"{name:<16}{_when(value, now) if _is_time(name) else _value(value)}"
                         for name, value in data.items())

    emit(row, as_json, human)


def _is_time(name: str) -> bool:
    return name.endswith(("_at", "_until"))


def _when(value: Any, now: float) -> str:
    """A Unix time as UTC and how far from now it is."""
    if not isinstance(value, (int, float)) or not value:
        return "-"
    delta = value - now
    relative = f"in {delta:.0f}s" if delta >= 0 else f"{-delta:.0f}s ago"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value)) + f" ({relative})"


def _params(params: Any) -> str:
    if not params:
        return "-"
    if isinstance(params, dict):
        return " ".join(f"{k}={v}" for k, v in params.items())
    return str(params)


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


# -- acting ------------------------------------------------------------------------------------

@swr.command("invalidate", short_help="Forget an entry, or all of a source's.")
@click.argument("source")
@params_argument
@json_option
@fleet_command
def invalidate(st: AppState, source: str, params: tuple[str, ...], as_json: bool) -> None:
    """Forget one entry of SOURCE (with NAME=VALUE parameters) or all of them (without),
    in memcached and, within l1_ttl, in every worker."""
    values = params_of(params)
    done = _answer(lambda: actions.invalidate_source(_prepared(st), source, values, _who()))
    _audit("invalidated", action="invalidate", scope=done["scope"], source=source,
           key=done["key"], entries=done["entries"])
    out = {"invalidated": done["scope"], "source": source, "params": values,
           "entries": done["entries"]}
    emit(out, as_json, lambda d: f"invalidated {d['invalidated']} {source}"
         f"{' ' + _params(values) if values else ''}: {_count(d['entries'], 'entry')} listed")


@swr.command("refresh", short_help="Refresh an entry now (or mark it stale).")
@click.argument("source")
@params_argument
@json_option
@fleet_command
def refresh(st: AppState, source: str, params: tuple[str, ...], as_json: bool) -> None:
    """Refresh the entry of SOURCE with these parameters: a /v1 source's is fetched now;
    a view's or function's is marked stale, so the next read refreshes it."""
    values = params_of(params)
    _prepared(st)
    with _settled(st):
        result = _answer(lambda: actions.refresh_source(st, source, values))
    key = result.pop("key")
    _audit("refresh requested", action="refresh", source=source, key=key, **result)
    out = {**result, "source": source, "params": values}
    emit(out, as_json, lambda d: d.get("how") or (
        "refreshed" if d.get("scheduled") else "not refreshed: a refresh of it is running "
        "or backing off"))


@swr.command("warm", short_help="Load a /v1 source's entry unless it is fresh.")
@click.argument("source")
@params_argument
@json_option
@fleet_command
def warm(st: AppState, source: str, params: tuple[str, ...], as_json: bool) -> None:
    """Load the entry of a /v1 SOURCE with these parameters unless it is fresh: a MISS is
    fetched now and stored for the fleet."""
    values = params_of(params)
    _prepared(st)
    configured = actions.configured(st).get(source)
    if configured is None:
        raise click.ClickException(
            f"{source!r} is not a /v1 source of this app: warm loads those only (a view or "
            "function is computed by its own code: request it, or use flask swr refresh)")
    job = _answer(lambda: actions.job_for(st, configured, configured.check(values)))
    with _settled(st):
        try:
            result: Result = st.region.get_or_load(job)
        except HTTPError as exc:
            raise click.ClickException(f"{source} could not be loaded: {exc.detail}") from None
    _audit("warmed", action="warm", source=source, key=job.key, status=result.status)
    timing = result.entry.timing if result.entry is not None else None
    out = {"source": source, "params": values, "id": digest(job.key), "status": result.status,
           "fresh_for": round(timing.fresh_until - st.clock(), 3) if timing else None}
    emit(out, as_json, lambda d: f"{d['status']} {source} {_params(values)} (id "
         f"{d['id'][:12]}): fresh for {_age(d['fresh_for'])}")
