"""``POST /v1/counters/NAME``'s numbers: unique for ever, never handed out twice.

A counter is memcached's atomic ``incr`` on one item, on the server the key's rendezvous
hash names. What can go wrong, and what this module does about each:

- **Its server is frozen, dead or cut off.** The key never moves to another server
  (:meth:`~service.memcache.clients.ClientPool.server_for`), so no stand-in counter starts
  from scratch elsewhere: the caller gets a 503 until the server answers again. An
  ``incr`` that timed out may still be applied when a frozen server thaws: that number is
  skipped, never repeated.
- **Its server restarted, flushed or evicted it.** The counter is gone and memcached
  cannot say which numbers it gave. It is created again at a *floor*: the counter's
  server's own clock in microseconds (``stats`` ``time`` x 10**6), read at the next tick
  of that clock (once the server has been up for two ticks), so the floor lies past every
  number of the counter's previous life (see :func:`plan`). A counter therefore starts
  near 1.8 x 10**15, counts by one from there, and jumps forward after a loss; creating
  one costs its first caller up to a second (three after a restart).
- **Something else sits under its key** (a non-number, a number below the floors this
  scheme writes, one past 2**53): treated as absent and replaced, with a CAS write so
  that two callers who both saw the garbage cannot both replace it (the second one
  would otherwise replace the first one's fresh counter and repeat its numbers).
- **One TCP segment is lost.** Linux retransmits a segment after its retransmission
  timeout, at least 200 ms (``TCP_RTO_MIN``) and doubling for a second loss (600 ms in
  all); a lost SYN after the initial 1 s. The shared 0.25 s ``timeout`` is shorter than
  one retransmission, so the counter's calls wait :data:`TIMEOUT` (and connect within
  :data:`CONNECT_TIMEOUT`) instead. A call that still times out is not retried: the
  lost ``incr`` may have been applied, and a retry would only skip a number and double
  every caller's wait on a frozen server; the caller gets a 503 and may post again.

The one assumption: a counter's server's clock does not step back across its restart
(the floor compares that one clock with itself, never two hosts' clocks), and a counter
hands out fewer than a million numbers per second of its life on average. Through a
proxy that does not pass ``stats`` (twemproxy), the creating worker's own clock stands in
for the server's: there, the fleet's clocks must agree to within the time a restart takes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final, TypeVar

import gevent
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheError

from ..errors import ItemRefused, Unavailable
from ..memcache.clients import borrow
from ..memcache.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

PER_SECOND: Final = 10**6
"""Numbers per second of the counter's server clock: a floor is that clock in µs."""
MIN_TIME: Final = 1_577_836_800             # 2020-01-01: an earlier server clock is wrong
MAX_TIME: Final = (2**53 - 1) // PER_SECOND  # the year 2255: numbers stay exact in JSON
MIN_VALUE: Final = MIN_TIME * PER_SECOND
"""Below this, not a number this scheme wrote (an old counter, garbage): replaced."""
MAX_VALUE: Final = 2**53 - 1
"""Above this, not a number this scheme wrote before 2255 (and not exact in JavaScript)."""
MIN_UPTIME: Final = 4
"""memcached's ``uptime`` reads 2 when it starts and grows by one per tick of its clock:
at 4 its clock has ticked twice, so it reads past the second the server started in,
whatever the phase of that clock against the wall clock (see :func:`plan`)."""
YOUNG_WAIT: Final = 4.0
"""Longest a caller waits for the server's clock to tick (a second, or up to three after
the server started)."""
TIMEOUT: Final = 1.0
"""Per call: above one retransmission (200 ms at least) and a second one (+400 ms)."""
CONNECT_TIMEOUT: Final = 1.5
"""A lost SYN is sent again after the initial retransmission timeout, 1 s."""
ATTEMPTS: Final = 4
_REFUSED: Final = object()


def usable(value: Any) -> bool:
    """Whether ``value`` (read from memcached) may be handed out as a counter's number."""
    return type(value) is int and MIN_VALUE < value <= MAX_VALUE


def parse(data: bytes | None) -> int | None:
    """The counter stored in ``data`` (memcached's ASCII digits, maybe space-padded after
    a ``decr``), or ``None`` when it is absent or not a usable number."""
    if data is None:
        return None
    digits = data.rstrip(b" ")
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 16:
        return None     # 16 digits hold MAX_VALUE; never int() a 5,000-digit string
    value = int(digits)
    return value if usable(value) else None


def plan(first_time: int, server_time: Any, uptime: Any) -> int | float | None:
    """Where a counter (re)starts, from its server's ``stats`` read before (``first_time``)
    and now: an ``int`` to start at, a ``float`` of seconds to wait and ask again, or
    ``None`` when the numbers are absurd (not integers, a clock outside 2020..2255).

    It starts at the first reading of the server's clock after ``first_time`` (one tick
    later, at most a second), in microseconds, on a server whose clock has ticked twice
    since it started (``uptime >= 4``). Why that is past every number of the counter's
    previous life, at most a million numbers per second of it:

    - *same server process* (flushed, evicted): that life started at the tick to its own
      reading ``R1 + 1``; its numbers stay below ``(R1 + 1 + x) * 10**6`` after ``x``
      seconds, and a reading taken after its loss is at least ``R1 + 1 + floor(x)``; the
      one a tick later is past that.
    - *restarted server*: memcached's clock reads ``floor(its start) + uptime - 2``,
      within a second of the wall clock, so the previous life's numbers stay below one
      second past its end, which came before this server started; a server with
      ``uptime >= 4`` reads at least two seconds past its start.

    Pure, so the cases are tested without memcached.
    """
    if type(server_time) is not int or type(uptime) is not int:
        return None
    if not (MIN_TIME <= server_time <= MAX_TIME) or not 0 <= uptime <= 2**40:
        return None
    if uptime < MIN_UPTIME:
        return float(MIN_UPTIME - uptime)
    if server_time <= first_time:
        return 0.1                  # the tick comes within a second; ask a few times
    return server_time * PER_SECOND


def _patient(fn: Callable[[Client], T], client: Client) -> T:
    """Run ``fn`` with the counter's timeouts on ``client``'s socket, then put back the
    pool's (the connection goes back to the pool for other callers)."""
    saved = (client.timeout, client.connect_timeout)
    client.timeout = max(TIMEOUT, saved[0] or 0)
    client.connect_timeout = max(CONNECT_TIMEOUT, saved[1] or 0)
    if client.sock is not None:
        client.sock.settimeout(client.timeout)
    try:
        return fn(client)
    finally:
        client.timeout, client.connect_timeout = saved
        if client.sock is not None:
            client.sock.settimeout(saved[0])


def _cas(mkey: bytes, data: bytes, token: bytes, client: Client) -> Any:
    return client.cas(mkey, data, token, 0, noreply=False)


def _server_stats(client: Client) -> Any:
    """``stats``, or :data:`_REFUSED` where a proxy does not pass it (caught here, inside
    the call, so that a proxy refusing one command is not taken for a failing server)."""
    try:
        return client.stats()
    except (MemcacheError, ConnectionResetError, BrokenPipeError):
        client.close()
        return _REFUSED


class Counters:
    """The counters of one app: ``bump(name)`` hands out the next number.

    :param store: the counters' own family (``state.store.child("counter")``).
    :param clock: stands in for the server's clock behind a proxy without ``stats``.
    """

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def bump(self, name: str) -> int:
        """The counter's next number, never one handed out before.

        :raises CacheUnavailable: its server did not answer (the view says 503).
        :raises Unavailable: the counter could not be (re)created in time.
        """
        mkey = self.store.key(name)
        for _ in range(ATTEMPTS):
            try:
                value = self._call(mkey, "incr", lambda c: c.incr(mkey, 1))
            except ItemRefused:
                value = _REFUSED        # not digits: garbage under the key
            if value is None:
                self._create(mkey)      # absent: first use, or lost with its server
            elif type(value) is int and usable(value):
                return value
            else:
                self._replace(mkey)     # a number this scheme never writes, or garbage
        raise Unavailable("the counter kept vanishing while it was created"
                          " (memcached evicting?)")

    def _call(self, mkey: bytes, command: str, fn: Callable[[Client], T]) -> T:
        with borrow(self.store.pool) as conn:
            return conn.call(conn.server_for(mkey), command, partial(_patient, fn))

    def _start(self, mkey: bytes) -> int:
        """The number to create the counter at (see :func:`plan`)."""
        deadline = time.monotonic() + YOUNG_WAIT
        first: int | None = None
        while True:
            stats = self._call(mkey, "stats", _server_stats)
            if stats is _REFUSED:
                return int(self.clock() * PER_SECOND)
            server_time = stats.get(b"time")
            if first is None and type(server_time) is int:
                first = server_time
            start = plan(first or 0, server_time, stats.get(b"uptime"))
            if start is None:
                raise Unavailable("the counter's memcached reports an absurd clock"
                                  f" (time={str(server_time)[:40]})")
            if isinstance(start, int):
                return start
            if time.monotonic() + min(start, 0.1) > deadline:
                raise Unavailable("the counter's memcached has just started; counters"
                                  " resume a few seconds after its start")
            # Wait for the server's clock to tick, holding no pooled connection meanwhile.
            gevent.sleep(min(start, 0.1))

    def _create(self, mkey: bytes) -> None:
        start = str(self._start(mkey)).encode("ascii")
        # add: of several callers who found it absent, exactly one creates it; the others'
        # add fails and they increment the winner's counter.
        self._call(mkey, "add", lambda c: c.add(mkey, start, 0, noreply=False))

    def _replace(self, mkey: bytes) -> None:
        data, _ = self._call(mkey, "gets", lambda c: c.gets(mkey))
        if data is None or parse(data) is not None:
            return      # gone, or somebody replaced it already: increment again
        log.warning("counter %s held %r, not a number of ours: replaced",
                    mkey.decode(), bytes(data[:40]))
        start = str(self._start(mkey)).encode("ascii")
        for _ in range(ATTEMPTS * 4):
            # Read again after the wait: other callers still increment the garbage, and
            # each increment changes the token.
            data, token = self._call(mkey, "gets", lambda c: c.gets(mkey))
            if data is None or parse(data) is not None:
                return
            # cas: only the item just read is replaced, never a counter another caller
            # has just created from the same garbage (whose numbers we would repeat).
            if self._call(mkey, "cas", partial(_cas, mkey, start, token)):
                return
