"""The admin's pieces in an app's read path: installed by the admin, never built by it.

The read path knows only an observer hook (:class:`service.readpath.ledger.Notes`). When the
admin is part of an app (its blueprint registered, or :func:`service.admin.init_app`), it
installs its registry as that observer and its per-minute reporter as a periodic job of
the app's refresher (so it starts after fork and stops with it). Idempotent: the
blueprint's ``record_once``, ``init_app`` and the first admin request may each call it.
"""

from __future__ import annotations

from ..flask.state import AppState
from .history import History
from .registry import Registry


def install(st: AppState) -> None:
    """Install the registry and the reporter in ``st``, once."""
    if "registry" in st.extra:
        return
    registry = st.extra["registry"] = Registry(st.store.child("registry"), st.tiers.local,
                                               st.clock)
    st.ledger.registry = registry
    history = st.extra["history"] = History(st.store.child("history"), st.clock, registry)
    st.refresher.register(history.job, history.every, history.report)


def registry_of(st: AppState) -> Registry | None:
    """The app's registry, when the admin installed one."""
    registry: Registry | None = st.extra.get("registry")
    return registry
