"""Make a blocked gevent hub visible in production.

A call that blocks the hub (CPU-bound code, a C library doing unpatched I/O, ``asyncio.run``
inside a view: one of the seed questions) stalls every request of that worker. gevent's
monitor thread notices the hub has not switched for ``max_blocking_time`` and emits an
``EventLoopBlocked`` event; we count it in ``gevent_hub_blocked_total`` and log the
innermost frames of the blocked stack (see :func:`blocking_stack`) as one structured line.

Started by :func:`service.worker.started` in each worker, after gevent patched it: the
monitor is a native thread, and threads must never be started at import or in the master.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.events
from gevent._monitor import MonitorWarning

from . import metrics
from .logs import event

log = logging.getLogger(__name__)
_subscribed = False

# Bounds of the logged stack: the innermost STACK_MAX_LINES lines, at most STACK_MAX_CHARS
# characters (whichever is smaller), plus a heading and a line saying what was cut.
STACK_MAX_LINES = 60
STACK_MAX_CHARS = 8000
_BLOCKED_STACK = "Blocked Stack"
# The latest events of this process, for the admin page (appended by the monitor thread:
# deque.append is atomic; the admin's reporter copies them to memcached for the fleet).
recent: deque[dict[str, Any]] = deque(maxlen=20)


def blocking_stack(report: Sequence[str] | str,
                   max_lines: int = STACK_MAX_LINES, max_chars: int = STACK_MAX_CHARS) -> str:
    """Where the hub is blocked, from gevent's report: the innermost frames, bounded.

    gevent's report (a list of printable lines, some holding several lines) is a heading, a
    ``Blocked Stack (for thread id ...):`` line, the hub thread's stack as
    ``traceback.format_stack`` writes it (outermost frame first: the blocking call is at
    its end), then ``Info:`` and every thread and greenlet of the process, which can be
    long. The frames that matter are the last ones of the blocked stack, so that section's
    tail is kept and its top is cut, with a line saying how much; the rest of the report is
    left out. A report without that section (another gevent version) is cut the same way.
    """
    text = report if isinstance(report, str) else "\n".join(str(part) for part in report)
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(_BLOCKED_STACK)), None)
    if start is None:
        heading, frames = [], lines
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i] == "Info:"), len(lines))
        heading, frames = [lines[start]], lines[start + 1:end]
    # The parts of the report are printed one per line, and the stack part ends with its own
    # newline: blank lines carry nothing.
    frames = [line for line in frames if line.strip()]
    return "\n".join(heading + _innermost(frames, max_lines, max_chars))


def _innermost(lines: list[str], max_lines: int, max_chars: int) -> list[str]:
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        if len(kept) == max_lines or size + len(line) + 1 > max_chars:
            break
        kept.append(line)
        size += len(line) + 1
    kept.reverse()
    if not kept and lines:
        kept = [lines[-1][-max_chars:]]    # one huge line: its end is the innermost part
    if len(kept) < len(lines):
        # Cut at a frame's "  File ..." line rather than between it and its source line.
        first_file = next((i for i, line in enumerate(kept) if line.startswith("  File ")), 0)
        kept = kept[first_file:]
    cut = len(lines) - len(kept)
    if cut:
        kept.insert(0, f"  ... {cut} line(s) of outer frames cut ...")
    return kept


def on_event(evt: Any) -> None:
    """zope.event subscriber: count and log hub-blocked events, ignore everything else."""
    if isinstance(evt, gevent.events.EventLoopBlocked):
        metrics.hub_blocked_total.inc()
        event(log, logging.WARNING, "hub_blocked",
              f"gevent hub blocked for more than {evt.blocking_time:.3f}s",
              blocking_time=evt.blocking_time, greenlet=str(evt.greenlet),
              stack=blocking_stack(evt.info or ()))
        recent.append({"at": time.time(), "seconds": evt.blocking_time,
                       "greenlet": str(evt.greenlet),
                       "stack": blocking_stack(evt.info or (), max_lines=12, max_chars=2000)})


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
