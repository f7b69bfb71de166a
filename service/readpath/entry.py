"""The envelope stored for every cached value.

An :class:`Entry` carries the value with what the policy and the HTTP layer need: when it
was stored (wall-clock seconds, comparable across hosts), its three windows, an ETag
computed from the encoded value, and how long the fetch took (XFetch's ``delta``). It is
stored through the safe codec as a plain dict, so a newer release can add fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import CodecError
from ..memcache import chunks, codec
from .freshness import Timing, Windows

ENVELOPE_VERSION = 1
MARKER = "\x00entry"
"""A key no value of a user's has (the codec wraps a dict whose only key starts with NUL,
and this one is never alone): tells an envelope from a plain value stored under a key."""


# Bounds of the numbers an envelope may hold: what this service writes stays far inside
# them; anything outside (infinity, NaN, 5,000 digits, the year 2286) is somebody's garbage,
# and such an item is unusable, so replaced by the next fetch, never a 500 on every read.
MAX_SECONDS = 10 * 366 * 86400.0   # a window, or a fetch: ten years
MAX_TIME = 2.0**33                 # a wall-clock time: the year 2242


def _number(raw: Any, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise CodecError(f"malformed cache entry: {type(raw).__name__} where a number goes")
    if isinstance(raw, int) and abs(raw) > 2**53:
        raise CodecError("malformed cache entry: a number out of bounds")
    value = float(raw)
    if not (math.isfinite(value) and low <= value <= high):
        raise CodecError("malformed cache entry: a number out of bounds")
    return value


def _seconds(raw: Any) -> float:
    return _number(raw, 0.0, MAX_SECONDS)


@dataclass(frozen=True)
class Entry:
    value: Any
    timing: Timing
    etag: str
    # The invalidation epoch it was computed in (service.tiers.TwoTier.epoch): a copy of
    # an older epoch is never answered again.
    epoch: str = ""

    @classmethod
    def create(cls, value: Any, stored_at: float, windows: Windows, fetch_seconds: float
               ) -> Entry:
        """A new entry; the ETag is a digest of the value's encoding.

        :raises CodecError: the value cannot be stored (the message names its type).
        """
        # A large value is joined and hashed off the hub (this may yield: a fetch's).
        digest = chunks.blake2b(codec.encode(value, chunks.join), digest_size=12)
        return cls(value, Timing(stored_at, windows, fetch_seconds), f'"{digest}"')

    @property
    def stored_at(self) -> float:
        return self.timing.stored_at

    @property
    def windows(self) -> Windows:
        return self.timing.windows

    def ttl(self, now: float) -> float:
        """What remains until GONE: memcached's expiry for this entry."""
        return max(1.0, self.timing.error_until - now)

    def to_wire(self) -> dict[str, Any]:
        w = self.windows
        return {
            MARKER: 1, "env": ENVELOPE_VERSION, "value": self.value, "stored_at": self.stored_at,
            "max_age": w.max_age, "swr": w.stale_while_revalidate, "sie": w.stale_if_error,
            "fetch": self.timing.fetch_seconds, "etag": self.etag, "epoch": self.epoch,
        }

    @staticmethod
    def is_wire(data: Any) -> bool:
        """Whether ``data`` read from memcached is an envelope (else: a plain value)."""
        return isinstance(data, dict) and data.get(MARKER) == 1

    @classmethod
    def from_wire(cls, data: Any) -> Entry:
        """Rebuild an entry read from memcached.

        :raises CodecError: not an envelope of a version we read.
        """
        try:
            if not isinstance(data, dict) or data.get("env") != ENVELOPE_VERSION:
                raise CodecError("not a cache entry envelope")
            windows = Windows(_seconds(data["max_age"]), _seconds(data["swr"]),
                              _seconds(data["sie"]))
            timing = Timing(_number(data["stored_at"], -MAX_TIME, MAX_TIME), windows,
                            _seconds(data["fetch"]))
            epoch = data.get("epoch", "")
            if not isinstance(epoch, str):
                raise CodecError("malformed cache entry: epoch")
            return cls(data["value"], timing, str(data["etag"]), epoch)
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed cache entry: {exc}") from exc
