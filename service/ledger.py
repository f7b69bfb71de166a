"""The admin's ledger: which keys this worker has served, and how their loads went.

memcached cannot list its keys, so the admin page shows what the workers know. The
region reports every read (:meth:`Ledger.seen`) and the loader every outcome
(:meth:`Ledger.finished`); nothing in the read path depends on the ledger, which is only
an observer. It is an LRU bounded to ``max_keys``, so a stream of distinct keys cannot
grow it without bound. The job of the latest read is kept so that the admin's "refresh"
works for any key, whichever front door (``/v1``, a decorator) served it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loader import Job


@dataclass
class Known:
    """What the admin page shows about one key."""

    source: str
    params: dict[str, Any] | None
    job: Job
    last_outcome: str | None = None
    last_refresh_at: float | None = None
    last_error: str | None = None


class Ledger:
    """A bounded record of the keys this worker served (see the module docstring)."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max(1, max_keys)
        self._known: OrderedDict[str, Known] = OrderedDict()

    def seen(self, job: Job) -> None:
        known = self._known.get(job.key)
        if known is None:
            params = dict(job.params) if job.params is not None else None
            self._known[job.key] = Known(job.source, params, job)
            while len(self._known) > self.max_keys:
                self._known.popitem(last=False)
        else:
            known.job = job
            if job.params is not None:
                known.params = dict(job.params)
            self._known.move_to_end(job.key)

    def finished(self, key: str, outcome: str, now: float, error: str | None = None) -> None:
        known = self._known.get(key)
        if known is not None:
            known.last_outcome, known.last_refresh_at, known.last_error = outcome, now, error

    def get(self, key: str) -> Known | None:
        return self._known.get(key)

    def items(self) -> list[tuple[str, Known]]:
        return list(self._known.items())

    def forget(self, key: str) -> None:
        self._known.pop(key, None)

    def __len__(self) -> int:
        return len(self._known)
