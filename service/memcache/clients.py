"""memcached connections: a bounded per-process pool, lent out one conversation at a time.

Why a pool and not one global client: a pymemcache ``Client`` is one socket and one
protocol stream; two greenlets using it at once interleave their commands and read each
other's answers. So each greenlet that needs memcached checks out a
:class:`~service.connection.Connection` of its own (one socket per server, opened on first
use) and gives it back when done. The connection, and the one boundary where memcached
errors are caught, counted and fed to the circuit breaker, live in
:mod:`service.connection`; this module decides who holds one and for how long.

Why not pymemcache's ``PooledClient``/``HashClient``: a full ``PooledClient`` raises
instead of waiting, and ``HashClient`` drops a dead server and rehashes its keys (lease
keys included) onto the others. Here a full pool makes the caller wait, bounded by
``pool_timeout``; a per-server circuit breaker stops us waiting on a dead server for every
call, and a key never moves to another server (see :meth:`ClientPool.server_for`).

Two ways to hold a connection:

- :func:`borrow` (what :class:`~service.store.Store` uses): for one memcached
  conversation, then straight back. It needs no app context, so a CLI command, a worker
  thread or a background greenlet caches exactly like a view, and a greenlet that then
  waits (for a lease holder, for the origin) holds no slot meanwhile.
- :func:`get_connection` (for a user's own views): checked out on the first use in a
  request, kept on ``flask.g``, given back by ``teardown_appcontext``, also when the view
  raised. :func:`release_connection` gives it back earlier.

Either way a connection whose call failed is closed and discarded, never handed back.
:func:`pool_for` keeps one pool per configuration per process, so the Flask-Caching backend
and the stale-while-revalidate layer share sockets. Nothing connects at import time or in
``init_app``: sockets are opened on first use, in the worker, and a forked child never
uses its parent's.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent.lock
from flask import Flask, current_app, g
from gevent import getcurrent
from pymemcache.client.base import Client
from pymemcache.client.rendezvous import RendezvousHash

from ..config import CacheSettings
from ..errors import PoolTimeout
from ..observe import metrics
from .breaker import CircuitBreaker
from .connection import Connection as Connection

EXTENSION = "service.clients"


class ClientPool:
    """At most ``pool_size`` connections per process; callers wait for a free one.

    Usually obtained through :func:`pool_for`. Sockets are opened lazily, on a
    connection's first command. The pool knows the process that built it: in a child
    forked after that (gunicorn with ``preload_app``), the first checkout starts afresh.
    """

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.servers = list(settings.servers)
        self._addresses = dict(zip(self.servers, settings.server_addresses(), strict=True))
        self._hash = RendezvousHash(nodes=list(self.servers))
        self.monotonic: Callable[[], float] = time.monotonic  # replaced by a fake in tests
        self.closed = False
        self.generation = 0
        self._start()

    def _start(self) -> None:
        self.breakers = {
            s: CircuitBreaker(self.settings.circuit_failures, self.settings.circuit_reset)
            for s in self.servers
        }
        # Bumped when a connection to the server fails: sockets opened before are stale.
        self.epochs = dict.fromkeys(self.servers, 0)
        # gevent's semaphore: waiting for a slot yields to other greenlets instead of
        # blocking the worker, and a bounded wait replaces PooledClient's "pool full" error.
        self._slots = gevent.lock.BoundedSemaphore(self.settings.pool_size)
        self._idle: list[Connection] = []
        self._pid = os.getpid()
        self.in_use = 0

    def _after_fork(self) -> None:
        # Everything inherited belongs to the parent: its sockets (closing our copy of a
        # descriptor leaves the parent's connection alone; sharing it would interleave
        # two processes' commands), its slot count, its view of failing servers.
        for conn in self._idle:
            conn.close()
        self.generation += 1
        self._start()

    def server_for(self, key: bytes) -> str:
        """The server of ``key``: its rendezvous winner, always, also while that server
        is down.

        A key never moves to another server. If it did, writes and invalidations made
        while its server is unreachable (dead, frozen, or cut off from this host only)
        would land on a stand-in, and the first server, back with its old data, would
        answer from before them: answers would go back in time, and a lease and its
        entry could sit on two servers. So a dead server's keys are answered from each
        worker's own copy and the origin, without fleet coordination (each worker
        fetches at most once per window, its in-process flight coalescing its
        greenlets), and its circuit breaker keeps us from waiting on it for every call.
        """
        if len(self.servers) == 1:
            return self.servers[0]
        name = key.decode("ascii")
        score = self._hash.hash_function
        # Highest score first, ties to the larger name: RendezvousHash.get_node's order.
        return max(self.servers, key=lambda s: (score(f"{s}-{name}"), s))

    def refuses(self, server: str) -> bool:
        """Whether ``server``'s port refuses a new connection (after a call failed)."""
        try:
            socket.create_connection(self._addresses[server],
                                     timeout=self.settings.connect_timeout).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            return False  # slow, unreachable, ...: not a certain death; count it as usual
        return False

    def new_client(self, server: str) -> Client:
        s = self.settings
        return _Client(
            self._addresses[server],
            connect_timeout=s.connect_timeout,
            timeout=s.timeout,
            no_delay=True,
            # With noreply, add() reports success even when the key exists: fatal for
            # leases and counters. Every command waits for memcached's answer.
            default_noreply=False,
            socket_module=_Sockets(),
        )

    def acquire(self) -> Connection:
        """Check a connection out, waiting at most ``pool_timeout`` for a free slot.

        Prefer :func:`borrow`, which always gives it back.

        :raises PoolTimeout: every connection stayed busy for the whole wait.
        """
        if os.getpid() != self._pid:
            self._after_fork()
        if not self._slots.acquire(timeout=self.settings.pool_timeout):
            metrics.memcached_errors_total.labels("pool_timeout").inc()
            raise PoolTimeout(
                f"no memcached connection free within {self.settings.pool_timeout}s"
                f" (pool_size={self.settings.pool_size})"
            )
        conn = self._idle.pop() if self._idle else Connection(self)
        conn.owner = getcurrent()
        self.in_use += 1
        metrics.pool_in_use.inc()
        return conn

    def release(self, conn: Connection) -> None:
        """Give a connection back; a broken one is closed and replaced later."""
        conn.owner = None
        if conn.generation != self.generation:
            conn.close()  # checked out before a fork: its slot belonged to the parent
            return
        if conn.broken or self.closed:
            conn.close()
        else:
            self._idle.append(conn)
        self.in_use -= 1
        metrics.pool_in_use.dec()
        self._slots.release()

    def close(self) -> None:
        """Close idle connections; those still checked out are closed on release.

        A closed pool still lends connections (opened per call, never kept), so a
        :class:`~service.store.Store` built on it keeps working; :func:`pool_for`
        replaces it for new users.
        """
        self.closed = True
        while self._idle:
            self._idle.pop().close()


@contextmanager
def borrow(pool: ClientPool) -> Iterator[Connection]:
    """A connection for one memcached conversation, given back when the block ends.

    A connection whose call failed (or was interrupted: a greenlet killed, a timeout
    raised into it) is closed instead of reused. Do not nest two borrows from one pool in
    one greenlet: with every slot taken, the inner one would wait for itself.

    :raises PoolTimeout: no connection freed up within ``pool_timeout``.
    """
    conn = pool.acquire()
    try:
        yield conn
    finally:
        pool.release(conn)


_pools: dict[tuple[Any, ...], ClientPool] = {}


def pool_for(settings: CacheSettings) -> ClientPool:
    """This process's pool for the servers, timeouts and sizes in ``settings``.

    Every user configured alike (the Flask-Caching backend, the SWR tiers, leases,
    counters, the readiness probe) shares one pool, so ``pool_size`` bounds the process's
    connections per server. The key prefix and the in-process tier do not matter here.
    A pool keeps working across fork (see :class:`ClientPool`); a closed one is replaced.
    """
    key = (settings.servers, settings.connect_timeout, settings.timeout, settings.pool_size,
           settings.pool_timeout, settings.circuit_failures, settings.circuit_reset)
    pool = _pools.get(key)
    if pool is None or pool.closed:
        # No yield between the look-up and the store: greenlets cannot race here.
        pool = _pools[key] = ClientPool(settings)
    return pool


def close_pools() -> None:
    """Close and forget every pool of this process (at shutdown, and between tests)."""
    while _pools:
        _pools.popitem()[1].close()


def get_pool(app: Flask | None = None) -> ClientPool:
    """The pool of ``app`` (by default the current one), as configured by :func:`init_app`."""
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    state: dict[str, Any] = app.extensions[EXTENSION]
    pool: ClientPool = state["pool"]
    if pool.closed:
        pool = state["pool"] = pool_for(state["settings"])
    return pool


def get_connection() -> Connection:
    """The connection of the current app context, checked out on first use.

    For a user's own views that talk to memcached directly; it stays checked out until
    the app context ends (or :func:`release_connection`).
    """
    conn: Connection | None = g.get("_memcached")
    if conn is None:
        conn = get_pool().acquire()
        g._memcached = conn
    return conn


def release_connection() -> None:
    """Give the current context's connection back before a long wait.

    A greenlet that waits (for another greenlet's fetch, for the origin) must not sit on
    a pooled connection meanwhile: with ``pool_size`` such waiters the pool is empty. The
    next :func:`get_connection` checks one out again.
    """
    conn: Connection | None = g.pop("_memcached", None)
    if conn is not None:
        get_pool().release(conn)


def _release_connection(exc: BaseException | None) -> None:
    # teardown_appcontext runs even when the view raised, so the slot always comes back.
    release_connection()


def init_app(app: Flask, settings: CacheSettings) -> None:
    """Give ``app`` its pool (no socket is opened) and the per-request checkout."""
    app.extensions[EXTENSION] = {"settings": settings, "pool": pool_for(settings)}
    app.teardown_appcontext(_release_connection)


class _Sockets:
    """The ``socket`` module, remembering the socket a client is opening (one per client,
    so greenlets never share it): see :class:`_Client`."""

    def __init__(self) -> None:
        self.opening: socket.socket | None = None

    def socket(self, *args: Any) -> socket.socket:
        self.opening = socket.socket(*args)
        return self.opening

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


class _Client(Client):  # type: ignore[misc]
    """pymemcache's client, closing the socket it was opening when the connect is cut
    short by a ``BaseException``: pymemcache closes it on an ``Exception`` only, so a
    background greenlet killed mid-connect (a refresher draining at shutdown) would leave
    it to the garbage collector."""

    def _connect(self) -> None:
        sockets = self.socket_module
        try:
            super()._connect()
        except BaseException:
            opening = getattr(sockets, "opening", None)
            if opening is not None and opening is not self.sock:
                opening.close()
            raise
        finally:
            if isinstance(sockets, _Sockets):
                sockets.opening = None
