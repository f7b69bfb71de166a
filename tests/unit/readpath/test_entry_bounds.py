"""Numbers read from memcached are data: an envelope whose numbers are not finite and
within their bounds is no entry (the read path then replaces it), never a 500 later."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import CodecError
from service.readpath.entry import MAX_SECONDS, MAX_TIME, Entry
from service.readpath.freshness import State, Windows, state

GOOD = Entry.create("v", 1_000_000.0, Windows(60, 600, 3600), 0.5).to_wire()
NUMBERS = ("max_age", "swr", "sie", "stored_at", "fetch")


@pytest.mark.parametrize("field", NUMBERS)
@pytest.mark.parametrize("value", [
    math.inf, -math.inf, math.nan, pytest.param(10**5000, id="5000-digits"), -1, "60", True,
    None, 2.0**40, 9e18])
def test_a_hostile_number_makes_the_envelope_no_entry(field: str, value: Any) -> None:
    if field == "stored_at" and value == -1:
        return  # a time before 1970 is odd but finite and harmless
    with pytest.raises(CodecError):
        Entry.from_wire({**GOOD, field: value})


@given(field=st.sampled_from(NUMBERS),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(min_value=-(10**30), max_value=10**30)))
def test_any_number_gives_an_entry_whose_state_can_be_decided_or_none(field: str,
                                                                     value: Any) -> None:
    try:
        entry = Entry.from_wire({**GOOD, field: value})
    except CodecError:
        return
    # What was accepted is finite and bounded: deciding its state never raises.
    for number in (entry.stored_at, entry.windows.max_age, entry.windows.lifetime,
                   entry.timing.fetch_seconds):
        assert math.isfinite(number)
    assert entry.windows.lifetime <= 3 * MAX_SECONDS and abs(entry.stored_at) <= MAX_TIME
    assert state(entry.timing, 1_000_000.0) in State
    entry.ttl(1_000_000.0)
