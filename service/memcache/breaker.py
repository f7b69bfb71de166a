"""A circuit breaker per memcached server: pure state, the caller passes the clock.

When a server fails ``failures`` times in a row its circuit opens and calls to it fail at
once for ``reset`` seconds, so a dead or frozen server costs one timeout per cool-down
instead of one per request. After the cool-down one caller is let through as a probe
(half-open); its success closes the circuit, its failure opens it again. A probe that never
reports back (its greenlet was killed) is replaced by a new one after another ``reset``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CircuitBreaker:
    failures: int = 3
    reset: float = 5.0
    consecutive: int = 0
    open_until: float = 0.0
    probe_since: float | None = None

    @property
    def is_open(self) -> bool:
        return self.consecutive >= self.failures

    def allow(self, now: float) -> bool:
        """Whether a call may go to the server at ``now``."""
        if not self.is_open:
            return True
        if now < self.open_until:
            return False
        if self.probe_since is not None and now < self.probe_since + self.reset:
            return False  # one probe at a time while half-open
        self.probe_since = now
        return True

    def routable(self, now: float) -> bool:
        """Whether :meth:`allow` would let a call through at ``now`` (without taking the
        half-open probe): the pool routes keys around a server for which it would not."""
        if not self.is_open or now < self.open_until:
            return not self.is_open
        return self.probe_since is None or now >= self.probe_since + self.reset

    def trip(self, now: float) -> None:
        """Open at once: the server certainly is not there (its port refuses connections)."""
        self.consecutive = max(self.consecutive, self.failures)
        self.probe_since = None
        self.open_until = now + self.reset

    def record_success(self) -> None:
        self.consecutive = 0
        self.probe_since = None

    def record_failure(self, now: float) -> None:
        self.consecutive += 1
        self.probe_since = None
        if self.is_open:
            self.open_until = now + self.reset

    def state(self, now: float) -> str:
        """``closed``, ``open`` or ``half-open``, for readiness and the admin page."""
        if not self.is_open:
            return "closed"
        return "open" if now < self.open_until else "half-open"
