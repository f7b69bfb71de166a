"""The application state: every per-app object of the read path, built in one place.

One :class:`AppState` lives in ``app.extensions["service"]``. It owns the clock (one
injected wall clock and one monotonic clock, shared by every piece, so a test moves time
for all of them at once) and wires the pieces: the store of the SWR namespace over the
worker's pool, the two tiers, the claims, the admin's ledger, the
refresher, the loader and the region. Building it connects nothing and spawns nothing:
sockets open on first use in the worker, and the refresher starts after fork.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, current_app

from ..config import Settings
from ..memcache.clients import ClientPool, pool_for
from ..memcache.store import Store
from ..readpath.fetching import Runner
from ..readpath.generations import Generations
from ..readpath.lease import Leases
from ..readpath.ledger import Ledger
from ..readpath.loader import Loader
from ..readpath.refresher import Refresher
from ..readpath.region import Region
from ..readpath.tiers import LocalTier, TwoTier

EXTENSION = "service"


@dataclass
class AppState:
    """Everything one app's read path needs (see the module docstring)."""

    app: Flask
    settings: Settings
    clock: Callable[[], float]
    monotonic: Callable[[], float]
    pool: ClientPool
    store: Store
    tiers: TwoTier
    leases: Leases
    ledger: Ledger
    refresher: Refresher
    loader: Loader
    region: Region
    generations: Generations
    # Set by the service's /v1 views: how a source's entry is read (state, source, params
    # -> Job), for the admin's refresh and the fast path, which may not import them.
    source_job: Callable[..., Any] | None = None
    # Filled by the modules that use them (service.views, service.admin, service.health).
    extra: dict[str, Any] = field(default_factory=dict)
    shutting_down: bool = False


def swr_namespace(settings: Settings) -> str:
    """The memcached namespace of SWR entries, leases, counters and generations: apart
    from the Flask-Caching backend's (``<prefix>.fc``), so no ``cache.get``/``cache.set``
    can read or clobber an SWR entry."""
    return f"{settings.cache.key_prefix}.swr"


def build(app: Flask, settings: Settings, clock: Callable[[], float] = time.time,
          monotonic: Callable[[], float] = time.monotonic) -> AppState:
    """Build and install the state of ``app``; see the module docstring."""
    pool = pool_for(settings.cache)
    store = Store(pool, swr_namespace(settings), settings.cache.item_size_max)
    local = LocalTier(settings.cache.l1_max_entries, settings.cache.l1_max_bytes)
    tiers = TwoTier(store, local, settings.cache.l1_ttl, monotonic, clock)
    leases = Leases(store, settings.refresh.lock_lease)
    ledger = Ledger(max(1000, settings.cache.l1_max_entries))
    refresher = Refresher(app, settings.refresh.concurrency, settings.refresh.backoff_max,
                          monotonic)
    loader = Loader(tiers, leases, settings.refresh, in_app_context(app), clock,
                    monotonic, observer=ledger)
    region = Region(tiers, loader, refresher, ledger, clock, settings.refresh.xfetch_beta)
    generations = Generations(store, settings.cache.l1_ttl, monotonic)
    state = AppState(app, settings, clock, monotonic, pool, store, tiers, leases,
                     ledger, refresher, loader, region, generations)
    # The admin, when registered, adds its observer and reporter (service.admin.install).
    app.extensions[EXTENSION] = state
    return state


def in_app_context(app: Flask) -> Runner:
    """A runner that calls a fetch inside a fresh app context of ``app``."""

    def run(fetch: Callable[[], Any]) -> Any:
        with app.app_context():
            return fetch()

    return run


def state_of(app: Flask | None = None) -> AppState:
    """The state of ``app`` (default: the current app).

    :raises RuntimeError: the app was not set up with :class:`service.SWR` or
        :func:`service.create_app`.
    """
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    state: AppState | None = app.extensions.get(EXTENSION)
    if state is None:
        raise RuntimeError("this Flask app has no swr-cache state: call SWR().init_app(app)")
    return state
