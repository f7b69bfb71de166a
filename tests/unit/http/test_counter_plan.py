"""Where a counter (re)starts, as a pure function of its server's ``stats``
(:func:`service.http.counters.plan`), and which stored numbers may be handed out
(:func:`~service.http.counters.parse`): no memcached needed."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from service.http.counters import (
    MAX_TIME,
    MAX_VALUE,
    MIN_TIME,
    MIN_UPTIME,
    MIN_VALUE,
    PER_SECOND,
    parse,
    plan,
    usable,
)

NOW = 1_796_000_000


def test_a_counter_starts_at_the_first_tick_after_the_loss_in_microseconds() -> None:
    assert plan(NOW, NOW + 1, 100) == (NOW + 1) * PER_SECOND
    assert plan(NOW, NOW + 7, 100) == (NOW + 7) * PER_SECOND


def test_it_waits_for_the_servers_clock_to_tick() -> None:
    # Created in the second it was lost in, it would hand out that second's numbers again.
    wait = plan(NOW, NOW, 100)
    assert isinstance(wait, float) and 0 < wait <= 1


def test_it_waits_for_a_server_that_just_started() -> None:
    # memcached's uptime reads 2 at its start: its clock may lag the wall clock by up to
    # two seconds then, so a previous life's numbers may lie ahead of it.
    for uptime in range(MIN_UPTIME):
        wait = plan(NOW - 1, NOW, uptime)
        assert isinstance(wait, float) and wait == MIN_UPTIME - uptime
    assert plan(NOW - 1, NOW, MIN_UPTIME) == NOW * PER_SECOND


@given(st.one_of(st.none(), st.floats(), st.text(), st.booleans(), st.integers(),
                 st.lists(st.integers(), max_size=3)),
       st.one_of(st.none(), st.floats(), st.text(), st.booleans(), st.integers()))
def test_absurd_clocks_are_refused_never_used(server_time: Any, uptime: Any) -> None:
    start = plan(NOW, server_time, uptime)
    sane = (type(server_time) is int and MIN_TIME <= server_time <= MAX_TIME
            and type(uptime) is int and 0 <= uptime <= 2**40)
    if not sane:
        assert start is None
    elif isinstance(start, int):
        assert usable(start + 1)


def test_every_start_is_a_usable_number_until_2255() -> None:
    assert usable(MIN_TIME * PER_SECOND + 1) and usable(MAX_TIME * PER_SECOND)
    assert MAX_TIME * PER_SECOND <= MAX_VALUE < 2**53


@given(st.one_of(st.binary(max_size=64), st.sampled_from([
    b"9" * 5000, b"inf", b"nan", b"-1", b"1e400", b"0", b"57", b"18446744073709551615",
    str(MAX_VALUE + 1).encode(), str(MIN_VALUE).encode(), b"\xd9\xa3",   # an Arabic-Indic 3
])))
def test_parse_takes_only_our_numbers(data: bytes) -> None:
    value = parse(data)
    assert value is None or (usable(value) and str(value).encode() == data.rstrip(b" "))


def test_parse_keeps_a_counter_padded_by_decr() -> None:
    assert parse(str(MIN_VALUE + 9).encode() + b" ") == MIN_VALUE + 9
    assert parse(None) is None
