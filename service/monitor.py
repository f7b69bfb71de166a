"""Make a blocked gevent hub visible in production.

A call that blocks the hub (CPU-bound code, a C library doing unpatched I/O, ``asyncio.run``
inside a view: one of the seed questions) stalls every request of that worker. gevent's
monitor thread notices the hub has not switched for ``max_blocking_time`` and emits an
``EventLoopBlocked`` event; we count it in ``gevent_hub_blocked_total`` and log the
blocking stack as one structured line.

Started by :func:`service.worker.started` in each worker, after gevent patched it: the
monitor is a native thread, and threads must never be started at import or in the master.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import gevent
import gevent.events
from gevent._monitor import MonitorWarning

from . import metrics
from .logs import event

log = logging.getLogger(__name__)
_subscribed = False


def on_event(evt: Any) -> None:
    """zope.event subscriber: count and log hub-blocked events, ignore everything else."""
    if isinstance(evt, gevent.events.EventLoopBlocked):
        metrics.hub_blocked_total.inc()
        stack = "".join(evt.info) if isinstance(evt.info, list) else str(evt.info)
        event(log, logging.WARNING, "hub_blocked",
              f"gevent hub blocked for more than {evt.blocking_time:.3f}s",
              blocking_time=evt.blocking_time, stack=stack[-4000:])


def start(threshold: float) -> None:
    """Start this worker's monitor thread with ``threshold`` seconds (idempotent)."""
    global _subscribed
    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = threshold
    # We log the report as one JSON line ourselves; gevent would also print it raw.
    gevent.config.print_blocking_reports = False
    if not _subscribed:
        gevent.events.subscribers.append(on_event)
        _subscribed = True
    with warnings.catch_warnings():
        # Without psutil gevent warns that it cannot also watch memory: not our concern.
        warnings.simplefilter("ignore", MonitorWarning)
        gevent.get_hub().start_periodic_monitoring_thread()
