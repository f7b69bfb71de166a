"""The admin's ledger: the read path's observer.

Two records, for two questions:

* *which keys has this worker served, and with which job?* An LRU bounded to
  ``max_keys``, fed by :meth:`Ledger.seen` on every read (a dict update, nothing more).
  The admin's "refresh" needs the job (how to recompute a decorated view or function
  exists only as a closure in a worker that served it), and a worker that cannot reach
  memcached lists these keys;
* *which keys does the whole fleet hold?* Every load's outcome (:meth:`Ledger.finished`,
  from the loader) goes on to the fleet-wide registry the admin installs, which
  writes it to memcached in the background.

Nothing in the read path depends on the ledger's answers: it only observes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .entry import Entry
    from .loader import Job


class Notes(Protocol):
    """Where the fleet's loads are written down (the admin's registry, when installed)."""

    def note(self, job: Job, outcome: str, now: float, error: str | None,
             entry: Entry | None) -> None:
        ...


@dataclass
class Known:
    """What this worker knows about one key it served."""

    source: str
    params: dict[str, Any] | None
    job: Job
    last_outcome: str | None = None
    last_refresh_at: float | None = None
    last_error: str | None = None


class Ledger:
    """See the module docstring.

    :param max_keys: how many keys this worker remembers (least recently read go first).
    :param registry: where the fleet's loads are written down: ``None`` until the admin
        installs its registry (:func:`service.admin.install`), and in unit tests.
    """

    def __init__(self, max_keys: int, registry: Notes | None = None) -> None:
        self.max_keys = max(1, max_keys)
        self.registry = registry
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

    def finished(self, key: str, outcome: str, now: float, error: str | None = None,
                 job: Job | None = None, entry: Entry | None = None) -> None:
        known = self._known.get(key)
        if known is not None:
            known.last_outcome, known.last_refresh_at, known.last_error = outcome, now, error
        if job is None and known is not None:
            job = known.job
        if self.registry is not None and job is not None:
            self.registry.note(job, outcome, now, error, entry)

    def get(self, key: str) -> Known | None:
        return self._known.get(key)

    def items(self) -> list[tuple[str, Known]]:
        return list(self._known.items())

    def forget(self, key: str) -> None:
        self._known.pop(key, None)

    def __len__(self) -> int:
        return len(self._known)
