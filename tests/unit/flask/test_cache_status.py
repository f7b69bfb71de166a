"""RFC 9211 ``Cache-Status``, parsed as the structured field (RFC 8941 list) it is."""

from __future__ import annotations

import re

import pytest

from service.flask.httpcache import accel_expires, cache_status
from service.readpath.entry import Entry
from service.readpath.freshness import Windows

TOKEN = re.compile(r"^[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*$")
INTEGER = re.compile(r"^-?[0-9]{1,15}$")


def parse(field: str) -> list[tuple[str, dict[str, object]]]:
    """A list of token items with parameters (bare keys are true, values tokens or
    integers): the subset of RFC 8941 that Cache-Status uses; anything else fails."""
    items = []
    for member in field.split(","):
        name, *params = (part.strip() for part in member.split(";"))
        assert TOKEN.match(name), name
        parsed: dict[str, object] = {}
        for param in params:
            key, eq, value = param.partition("=")
            assert re.match(r"^[a-z*][a-z0-9_\-.*]*$", key), key
            if not eq:
                parsed[key] = True
            elif INTEGER.match(value):
                parsed[key] = int(value)
            else:
                assert TOKEN.match(value), value
                parsed[key] = value
        items.append((name, parsed))
    return items


ENTRY = Entry.create("v", 1000.0, Windows(max_age=60, stale_while_revalidate=600), 0.0)


@pytest.mark.parametrize("status, age, expected", [
    ("HIT", 10, {"hit": True, "ttl": 50}),
    ("STALE", 70, {"hit": True, "ttl": -10, "detail": "stale"}),
    ("MISS", 0, {"fwd": "uri-miss", "stored": True, "ttl": 60}),
])
def test_an_answer_from_an_entry(status: str, age: int, expected: dict[str, object]) -> None:
    assert parse(cache_status(status, ENTRY, age)) == [("swr-cache", expected)]


def test_an_uncacheable_answer_says_it_was_not_stored() -> None:
    assert parse(cache_status("PASS", None, 0)) == [
        ("swr-cache", {"fwd": "uri-miss", "detail": "uncacheable"})]
    assert parse(cache_status("MISS", None, 0)) == [("swr-cache", {"fwd": "uri-miss"})]


@pytest.mark.parametrize("age, expected", [(0, "59"), (10, "49"), (59, "0"), (60, "0"),
                                           (70, "0")])
def test_nginx_is_told_the_freshness_surely_left(age: int, expected: str) -> None:
    # The age sent is rounded down: one second is kept back, never a negative number.
    assert accel_expires(ENTRY, age) == expected
