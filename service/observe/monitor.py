"""Make a blocked gevent hub visible in production.

A call that blocks the hub (CPU-bound code, a C library doing unpatched I/O, ``asyncio.run``
inside a view: one of the seed questions) stalls every request of that worker. The hub
beats (a timer of its loop, every quarter of ``threshold``); a native thread looks at the
beat as often, and when none came for longer than ``threshold`` it emits gevent's
``EventLoopBlocked`` event with the hub thread's stack; we count it in
``gevent_hub_blocked_total`` and log the innermost frames of the blocked stack (see
:func:`blocking_stack`) as one structured line.

Why not gevent's own monitor thread (``gevent.config.monitor_thread``): it learns that the
hub is blocked from a greenlet trace function called on every switch of every greenlet,
two or more per request; the beat costs four timer callbacks per ``threshold`` whatever
the load. It also sees what gevent's cannot: the hub itself blocked in a callback.

Started by :func:`service.worker.started` in each worker, after gevent patched it: the
monitor is a native thread, and threads must never be started at import or in the master.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import traceback
from collections import deque
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.events
import greenlet  # type: ignore[import-untyped]  # gevent's own dependency
from gevent import monkey

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


class Watchdog:
    """The hub's beat and the native thread that watches it (:func:`start`).

    The beat is a timer of the hub's loop that only stamps the time: it runs whenever the
    loop runs, and never while a greenlet (or a callback of the hub) keeps the loop from
    running. It does not keep the loop alive (``ref=False``). The watcher is a thread of
    the operating system (gevent's patch would make it a greenlet, which could not run
    while the hub is blocked), so it sleeps on an unpatched lock, which :meth:`stop`
    releases to wake it at once.
    """

    def __init__(self, hub: Any, threshold: float) -> None:
        self.hub = hub
        self.threshold = threshold
        self.period = threshold / 4
        self.last_beat = time.perf_counter()
        self.timer = hub.loop.timer(self.period, self.period, ref=False)
        self.timer.start(self._beat)
        allocate = monkey.get_original("_thread", "allocate_lock")
        self._stopping = allocate()
        self._stopping.acquire()
        self._stopped = allocate()
        self._stopped.acquire()
        monkey.get_original("_thread", "start_new_thread")(self._watch, ())

    def _beat(self) -> None:
        self.last_beat = time.perf_counter()

    def _watch(self) -> None:
        reported = None
        try:
            while not self._stopping.acquire(timeout=self.period):
                beat = self.last_beat
                # The next beat was due one period after this one: later than the
                # threshold after that, the loop has not run for at least the threshold.
                if beat != reported and time.perf_counter() - beat > self.threshold + self.period:
                    reported = beat   # once per blocking: the next report needs a new beat
                    self._report()
        finally:
            self._stopped.release()

    def _report(self) -> None:
        frame = sys._current_frames().get(self.hub.thread_ident)
        stack = (traceback.format_stack(frame) if frame is not None
                 else [f"Unknown: no thread found for hub {self.hub!r}\n"])
        running = _running_greenlet(self.hub)
        info = [f"Greenlet {running} appears to be blocked",
                f"Blocked Stack (for thread id {hex(self.hub.thread_ident)}):", "".join(stack)]
        gevent.events.notify(gevent.events.EventLoopBlocked(running, self.threshold, info))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the beat and the thread (from the hub's thread; a test's clean-up)."""
        self.timer.stop()
        self.timer.close()
        self._stopping.release()
        self._stopped.acquire(timeout=timeout)


def _running_greenlet(hub: Any) -> Any:
    """The greenlet running in the hub's thread (asked from another thread, at a report
    only: it looks through every object). A running greenlet is the only active one
    without a saved frame; the hub's thread is told by the main greenlet at the root of
    its parents."""
    def root(glet: Any) -> Any:
        while glet.parent is not None:
            glet = glet.parent
        return glet

    hubs_root = root(hub)
    for obj in gc.get_objects():
        if (isinstance(obj, greenlet.greenlet) and obj and obj.gr_frame is None
                and root(obj) is hubs_root):
            return obj
    return None


_watchdog: Watchdog | None = None


def start(threshold: float) -> None:
    """Start this worker's monitor with ``threshold`` seconds (idempotent)."""
    global _subscribed, _watchdog
    if not _subscribed:
        gevent.events.subscribers.append(on_event)
        _subscribed = True
    hub = gevent.get_hub()
    if _watchdog is not None and _watchdog.hub is hub and _watchdog.threshold == threshold:
        return
    stop()
    _watchdog = Watchdog(hub, threshold)


def stop() -> None:
    """Stop this process's monitor, if it runs."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
