"""One memcached conversation partner: a socket per server, for one greenlet at a time.

Why one socket per server per greenlet: a pymemcache ``Client`` is one socket and one
protocol stream; two greenlets writing to it at once interleave their commands and read
each other's answers. So a :class:`Connection` is checked out of the pool
(:class:`~service.clients.ClientPool`) by one greenlet, opens a socket to each server it
talks to on first use, and refuses to be used by any other greenlet until it is given back.

Why everything goes through :meth:`Connection.call`: it is the single boundary where
memcached failures (``MemcacheError``, ``OSError``) are caught, classified (timeout,
connection, SERVER_ERROR, CLIENT_ERROR), counted, logged, fed to the server's circuit
breaker and turned into :class:`~service.errors.CacheUnavailable` (or
:class:`~service.errors.ItemRefused` for one refused item, which leaves the socket usable).
A connection whose call failed, or was interrupted mid-command (a killed greenlet, a
timeout raised into it), is marked broken and closed, so a half-read answer is never read
as the next command's reply; the pool discards it instead of lending it again. Nothing
deeper than this boundary swallows memcached errors.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from gevent import getcurrent
from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from ..errors import CacheUnavailable, CircuitOpen, ItemRefused
from ..observe import metrics
from ..observe.logs import event
from .breaker import CircuitBreaker

log = logging.getLogger(__name__)
T = TypeVar("T")


class Servers(Protocol):
    """What a connection needs of the servers it talks to (the pool provides it):
    routing, each server's breaker and failure epoch, new clients, and a liveness check.
    A protocol, so this module never imports the pool that imports it."""

    breakers: dict[str, CircuitBreaker]
    epochs: dict[str, int]
    generation: int

    def server_for(self, key: bytes) -> str: ...

    def monotonic(self) -> float: ...

    def new_client(self, server: str) -> Client: ...

    def refuses(self, server: str) -> bool: ...


class Connection:
    """One socket per memcached server, used by one greenlet at a time.

    Every command goes through :meth:`call`, the single boundary where memcached errors
    are caught, counted, logged, fed to the circuit breaker and turned into
    :class:`~service.errors.CacheUnavailable`.
    """

    def __init__(self, pool: Servers) -> None:
        self._pool = pool
        self._clients: dict[str, Client] = {}
        self._epochs: dict[str, int] = {}   # the server's epoch each client was opened in
        self.broken = False
        self.owner: Any = None
        self.generation = pool.generation

    def server_for(self, key: bytes) -> str:
        return self._pool.server_for(key)

    def call(self, server: str, command: str, fn: Callable[[Client], T]) -> T:
        """Run ``fn`` with the client of ``server``.

        :raises CircuitOpen: the server failed recently and is not asked now.
        :raises CacheUnavailable: the call failed; this connection is now broken.
        """
        if self.owner is not None and self.owner is not getcurrent():
            # A connection belongs to the greenlet that checked it out; another greenlet
            # must borrow its own (or, for the one on g, push its own app context).
            raise RuntimeError("a memcached connection was used by a second greenlet")
        breaker = self._pool.breakers[server]
        now = self._pool.monotonic()
        if not breaker.allow(now):
            metrics.memcached_errors_total.labels("circuit_open").inc()
            raise CircuitOpen(f"memcached {server}: circuit open after repeated failures")
        client = self._clients.get(server)
        epoch = self._pool.epochs[server]
        if client is not None and self._epochs.get(server) != epoch:
            # Another connection saw this server fail since this socket was opened: it is
            # most likely dead too (a restart kills every socket). Reconnect now rather than
            # find out one failed call, and one breaker strike, per idle connection.
            _close(client)
            client = None
        if client is None:
            client = self._clients[server] = self._pool.new_client(server)
            self._epochs[server] = epoch
        try:
            result = fn(client)
        except (MemcacheError, OSError) as exc:
            kind = _error_kind(exc)
            if kind == "client":
                # CLIENT_ERROR about one item (incr of a non-number, a value too large):
                # the server and this socket are fine; only this call failed.
                metrics.memcached_errors_total.labels(kind).inc()
                event(log, logging.WARNING, "memcached_error",
                      f"memcached {command} refused by {server}: {_reason(exc, kind)}",
                      server=server, command=command, kind=kind, error=str(exc))
                raise ItemRefused(f"memcached {server}: {command} refused: {exc}") from exc
            if kind != "server":
                self._pool.epochs[server] = epoch + 1
            # A server that answered SERVER_ERROR is alive: do not trip its breaker.
            if kind != "server":
                was_open = breaker.is_open
                breaker.record_failure(self._pool.monotonic())
                if kind == "connection" and self._pool.refuses(server):
                    # Nothing listens there: the server is gone, not slow. Open its circuit
                    # now, so this process stops asking it at once instead of after
                    # `circuit_failures` more errors, each a wasted round trip.
                    breaker.trip(self._pool.monotonic())
                if breaker.is_open and not was_open:
                    # Said once per outage, in words a newcomer can act on.
                    log.warning(
                        "memcached %s is unreachable (%s); answering from the in-process "
                        "tier and the origins without it, and trying again every %gs. "
                        "Check that memcached runs there, or set CACHE_MEMCACHED_SERVERS "
                        "(Flask config) / [cache] servers (settings.toml).",
                        server, _reason(exc, kind), breaker.reset)
            metrics.memcached_errors_total.labels(kind).inc()
            # The line says where and why by itself: an app without a logging config of its
            # own prints the message alone, not the event's fields.
            event(log, logging.WARNING, "memcached_error",
                  f"memcached {command} failed on {server}: {_reason(exc, kind)}",
                  server=server, command=command, kind=kind, error=str(exc))
            self.broken = True
            self.close()
            raise CacheUnavailable(f"memcached {server}: {command} failed: {exc}") from exc
        except BaseException:
            # GreenletExit or a timeout raised into us mid-command leaves a half-read
            # answer on the socket: the next command would read it. Never reuse it.
            self.broken = True
            self.close()
            raise
        if breaker.is_open:
            log.warning("memcached %s answers again; using it", server)
        breaker.record_success()
        metrics.memcached_call_seconds.labels(command).observe(self._pool.monotonic() - now)
        return result

    def by_server(self, keys: Iterable[bytes]) -> dict[str, list[bytes]]:
        """Group keys by the server that owns them, for multi-key commands."""
        groups: dict[str, list[bytes]] = {}
        for key in keys:
            groups.setdefault(self.server_for(key), []).append(key)
        return groups

    def close(self) -> None:
        for client in self._clients.values():
            _close(client)
        self._clients.clear()


def _close(client: Client) -> None:
    try:
        client.close()
    except OSError:  # closing a socket that already broke
        pass


def _reason(exc: BaseException, kind: str) -> str:
    """Why a call failed, never empty (a closed socket's exception has no message)."""
    text = str(exc)
    return f"{kind}: {text}" if text else f"{kind} ({type(exc).__name__})"


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, MemcacheClientError | MemcacheIllegalInputError):
        return "client"
    if isinstance(exc, MemcacheServerError) and not isinstance(exc, MemcacheUnexpectedCloseError):
        return "server"
    return "connection"
