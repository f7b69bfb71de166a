"""Running one fetch: in a greenlet of its own, bounded by ``fetch_timeout``, with the
lease renewed beside it.

Why a greenlet of its own, not ``gevent.Timeout`` around the call: the timeout is
enforced from outside, so a fetch that swallows exceptions (or a C call that ignores
them) cannot outlive it; the caller stops waiting and the fetch is killed. Meanwhile a
second greenlet renews the claim at a third of its lifetime, so a slow but live holder
keeps it; a holder that dies stops renewing and the lease lapses for the next worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent

from ..errors import CacheUnavailable, HTTPError, OriginError, OriginTimeout
from .lease import Claim, Leases, renew_every

Runner = Callable[[Callable[[], Any]], Any]
"""Runs a fetch inside the context it needs (an app context, the caller's request...)."""


class Fetcher:
    """Runs fetches for one loader (see the module docstring)."""

    def __init__(self, leases: Leases, timeout: float) -> None:
        self.leases = leases
        self.timeout = timeout

    def run(self, fetch: Callable[[], Any], run: Runner, source: str, wrap_errors: bool,
            lease: Claim | None) -> Any:
        """Run ``fetch`` through ``run`` and return its value.

        :raises OriginTimeout: no answer within the timeout (the fetch is killed).
        :raises HTTPError: what the fetch raised, if it is one.
        :raises Exception: with ``wrap_errors`` off, whatever the fetch raised; otherwise
            an :class:`OriginError` naming it.
        """
        renewer = gevent.spawn(self._renew, lease) if lease is not None else None
        try:
            return self._run(fetch, run, source, wrap_errors)
        finally:
            if renewer is not None:
                renewer.kill(block=True)

    def _run(self, fetch: Callable[[], Any], run: Runner, source: str,
             wrap_errors: bool) -> Any:
        def body() -> tuple[bool, Any]:
            # Failures are returned, not raised, so gevent does not print every origin
            # error as a crashed greenlet; the loader logs and counts them.
            try:
                return True, run(fetch)
            except Exception as exc:  # noqa: BLE001 - handed to the caller as a value
                return False, exc

        fetcher = gevent.spawn(body)
        try:
            fetcher.join(timeout=self.timeout)
        finally:
            if not fetcher.ready():
                fetcher.kill(block=False)  # the timeout, or our own caller was killed
        if not fetcher.ready():
            raise OriginTimeout(f"{source}: no answer within {self.timeout:g}s")
        if not fetcher.successful():
            raise OriginError(f"{source}: the fetch was interrupted")
        ok, value = fetcher.value
        if ok:
            return value
        if isinstance(value, HTTPError) or not wrap_errors:
            raise value
        raise OriginError(f"{source}: {type(value).__name__}: {value}") from value

    def _renew(self, lease: Claim) -> None:
        while True:
            gevent.sleep(renew_every(self.leases.lock_lease))
            try:
                if not self.leases.renew(lease):
                    return  # lost: the fenced write protects any newer value
            except CacheUnavailable:
                pass  # try again at the next interval; the lease may still hold
