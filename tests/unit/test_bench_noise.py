"""The bench's CPU-stall control counts stalls the way its report says it does."""

from __future__ import annotations

from bench.noise import slow_stretches, summarise


def test_runs_of_slow_windows_longest_last() -> None:
    counts = [100] * 10 + [10, 10, 10] + [100] * 5 + [29] + [100] * 3 + [0, 0]
    assert slow_stretches(counts) == [1, 2, 3]


def test_the_bound_is_a_share_of_the_median_not_of_the_mean() -> None:
    # One huge window would lift a mean-based bound above every ordinary window.
    counts = [100] * 20 + [100_000]
    assert slow_stretches(counts) == []
    assert slow_stretches([100] * 20 + [30, 29]) == [1]   # 30 is not under 30% of 100


def test_summary_in_milliseconds() -> None:
    s = summarise({"counts": [100] * 50 + [0] * 4 + [100] * 10 + [5],
                   "steal_ticks": 3, "ticks_per_second": 100})
    assert (s["stalls"], s["stalled_windows"], s["windows"]) == (2, 5, 65)
    assert s["longest_ms"] == 40.0
    assert s["longest_five_ms"] == [10.0, 40.0]
    assert s["steal_ms"] == 30.0


def test_no_windows_no_stalls() -> None:
    assert slow_stretches([]) == []
