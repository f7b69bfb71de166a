"""The bench's in-process pieces measure the shipped hook and turn as they run, and add
up the way its report says they do."""

from __future__ import annotations

import pytest

from bench import pieces


def test_the_hook_and_the_turn_are_timed_on_the_shipped_code() -> None:
    # Both run the shipped functions (a change to what post_request keeps per connection
    # must not leave this bench measuring an exception).
    assert 0.0 <= pieces.hook(n=300) < 0.01
    assert 0.0 < pieces.turn(n=20) < 0.01


def test_each_row_adds_its_pieces_against_its_own_baseline() -> None:
    measured = {name: 1e-6 for parts in pieces.SUMS.values() for name in parts}
    rows = {row: (added, ratio) for row, added, ratio in
            pieces.implied(measured, stock_raw=100e-6, stock_flask=200e-6)}
    added, ratio = rows["raw app, our config"]
    assert added == pytest.approx(3e-6) and ratio == pytest.approx(100 / 103)
    added, ratio = rows["bare Flask view, our hooks"]
    assert added == pytest.approx(4e-6) and ratio == pytest.approx(200 / 204)
    assert rows["`/v1` hit"][0] == pytest.approx(5e-6)
