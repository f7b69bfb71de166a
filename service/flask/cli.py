"""``flask swr``: the command group every app that uses :class:`service.SWR` gets.

``SWR.init_app`` adds the group to ``app.cli``; its commands (``stats``, ``entries``,
``show``, ``invalidate``, ``refresh``, ``warm``) come with the admin
(:mod:`service.admin.cli`), because they read what the admin's registry records in the
workers and act through the admin's own functions. The admin adds them to this group
when it is imported, which an app does when it registers ``service.admin.bp`` (the
service does in ``create_app``): the read path never imports the admin, and an app
without it is told what to add instead of "no such command".

What is here is the part every command shares and the flask layer can do alone: the
output (a table for people, ``--json`` for scripts) and memcached's reachability,
checked first so that a command never answers from this process's empty memory as if it
were the fleet's: a server out of reach ends the command with status 1 and a message
naming the address, the reason and the config key that sets it.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from ..config import FLASK_CONFIG
from ..errors import CacheUnavailable
from ..memcache.clients import borrow
from .state import AppState, state_of

F = TypeVar("F", bound=Callable[..., Any])
UNAVAILABLE = 1

ADMIN_MISSING = (
    "the `flask swr` commands come with the admin, which records the fleet's entries in "
    "the workers: register it in this app (from service import admin; "
    "app.register_blueprint(admin.bp)) and restart the workers")


class SwrGroup(AppGroup):
    """The group; a command asked for before the admin added it says why it is missing."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and not self.commands:
            ctx.fail(f"no command {cmd_name!r}: {ADMIN_MISSING}")
        return found


@click.group("swr", cls=SwrGroup)
@click.option("-v", "--verbose", is_flag=True,
              help="Also print the service's log lines (the actions' audit lines, "
                   "memcached's warnings) on stderr.")
def swr(verbose: bool) -> None:
    """See and steer the fleet's stale-while-revalidate cache (through memcached, like
    the workers; no admin token needed: this machine has the config)."""
    if not verbose:
        # A command's answer is its output, and a failure its one message: the workers'
        # log lines (memcached warnings, the audit line) would say it all again. Only
        # while the command runs (the process may be a test's, or a shell's).
        logger = logging.getLogger("service")
        previous = logger.level
        logger.setLevel(logging.ERROR)
        click.get_current_context().call_on_close(lambda: logger.setLevel(previous))


def init_app(app: Flask) -> None:
    """Add ``flask swr`` to the app's command line (once)."""
    if "swr" not in app.cli.commands:
        app.cli.add_command(swr)


def state() -> AppState:
    """The state of the app the command runs in, or a clear failure."""
    try:
        return state_of(current_app._get_current_object())  # type: ignore[attr-defined]
    except RuntimeError:
        raise click.ClickException(
            "this app never called swr.init_app(app) (or SWR(app)): `flask swr` works on "
            "an app set up with swr-cache") from None


def servers_key(st: AppState) -> str:
    """The config key that set the memcached servers of the app, in words."""
    path = st.settings.path
    flask_key = "CACHE_MEMCACHED_SERVERS (the app's Flask config)"
    if path == FLASK_CONFIG:
        return flask_key
    if path.startswith("<"):
        return f"[cache] servers of the settings given to the app ({path})"
    if "CACHE_MEMCACHED_SERVERS" in st.app.config:
        return f"[cache] servers in {path} (over {flask_key})"
    return f"[cache] servers in {path}"


def check_memcached(st: AppState) -> dict[str, str]:
    """Ask every memcached server for its version, as ``/readyz`` does; the versions by
    server.

    :raises click.ClickException: a server did not answer (exit status 1), with its
        address, the reason and the config key to fix.
    """
    versions: dict[str, str] = {}
    problems: list[str] = []
    try:
        with borrow(st.pool) as conn:
            for server in st.pool.servers:
                try:
                    versions[server] = conn.call(server, "version",
                                                 lambda c: c.version().decode())
                except CacheUnavailable as exc:
                    problems.append(f"memcached {server} is unreachable: "
                                    f"{exc.__cause__ or exc}")
    except CacheUnavailable as exc:  # no pooled connection freed up in time
        problems.append(f"no memcached connection: {exc}")
    if problems:
        raise click.ClickException(
            "; ".join(problems) + f". Start memcached there, or point "
            f"{servers_key(st)} at the servers the workers use.")
    return versions


def fleet_command(fn: F) -> F:
    """A command that needs memcached: checked first (see :func:`check_memcached`), and a
    memcached failure midway is the same clear exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        st = state()
        check_memcached(st)
        try:
            return fn(st, *args, **kwargs)
        except CacheUnavailable as exc:
            raise click.ClickException(
                f"{exc}. Check that memcached runs there, or point {servers_key(st)} "
                "at the servers the workers use.") from None

    return wrapper  # type: ignore[return-value]


def params_of(pairs: Iterable[str]) -> dict[str, str]:
    """``k=v`` arguments as a dict; anything else is a usage error naming it."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="PARAMS")
        out[name] = value
    return out


def emit(data: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """``data`` as JSON (``--json``) or as ``human`` words."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(human(data))


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain table: columns padded to their widest cell, ``-`` for nothing."""
    cells = [[str(c) for c in header]] + [["-" if c is None or c == "" else str(c)
                                           for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON (for scripts) instead of a table.")
