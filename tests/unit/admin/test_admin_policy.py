"""The admin's pure parts: registry merging and trimming, fetch-time percentiles, filters."""

from __future__ import annotations

import math
from typing import Any

import pytest

from service.admin.entries import Filters
from service.admin.registry import expired, kind_of, merge_records, valid_record
from service.admin.stats import nearest_rank, observed, percentiles
from service.readpath.freshness import Windows
from service.readpath.loader import Job


def rec(key: str, t: float, outcome: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"k": key, "s": "src", "kind": "source", "p": {}, "o": outcome, "e": None,
            "t": t, "h": "host", "pid": 1, **extra}


def test_newer_news_wins_and_a_failure_keeps_the_stored_entry() -> None:
    stored = rec("a", 10.0, sa=10.0, w=[60, 0, 0], etag='"x"', z=5, f=0.1)
    merged = merge_records({}, [stored], now=20.0, limit=10)
    failed = rec("a", 30.0, "error", e="boom")
    merged = merge_records(merged, [failed], now=30.0, limit=10)
    assert merged["a"]["o"] == "error" and merged["a"]["e"] == "boom"
    assert merged["a"]["sa"] == 10.0 and merged["a"]["etag"] == '"x"'   # still stored
    late = rec("a", 25.0, sa=25.0, w=[60, 0, 0])                        # older news
    assert merge_records(merged, [late], now=30.0, limit=10)["a"]["o"] == "error"
    gone = merge_records(merged, [rec("a", 40.0, "invalidated")], now=40.0, limit=10)
    assert gone["a"]["o"] == "invalidated" and gone["a"].get("sa") is None


def test_records_are_trimmed_to_the_most_recent_and_expired_ones_dropped() -> None:
    many = [rec(f"k{i}", float(i), sa=float(i), w=[60, 0, 0]) for i in range(10)]
    kept = merge_records({}, many, now=10.0, limit=4)
    assert sorted(kept) == ["k6", "k7", "k8", "k9"]
    assert expired(rec("a", 0.0, sa=0.0, w=[10, 10, 10]), now=91.0)
    assert not expired(rec("a", 0.0, sa=0.0, w=[10, 10, 10]), now=89.0)
    assert expired(rec("a", 0.0, "error"), now=3601.0)                   # no entry, old


def test_only_records_of_our_shape_are_read() -> None:
    assert valid_record(rec("a", 1.0))
    for bad in (None, [], {"k": 1}, {**rec("a", 1.0), "t": "x"}, {**rec("a", 1.0), "p": 3}):
        assert not valid_record(bad)


def test_kind_of_each_front_door() -> None:
    def job(key: str, source: str = "f", params: Any = None) -> Job:
        return Job(key, lambda: None, Windows(1), source=source, params=params)

    assert kind_of(job("src:items:0?id=1", "items", {"id": "1"})) == "source"
    assert kind_of(job("fn:mod.f:abc")) == "function"
    assert kind_of(job("view//report?", "report", {})) == "view"
    assert kind_of(job("rates", "rates")) == "periodic"


def test_histogram_percentiles_are_the_bucket_bounds_never_interpolated() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, math.inf: 100.0}
    p = percentiles(buckets)
    assert p["count"] == 100 and p["basis"] == "bucket bounds"
    assert (p["p50"], p["p90"], p["p99"]) == (0.1, 0.5, 1.0)
    # 1.0 s fetches land in the (1, 2.5] bucket: "at most 2.5 s", not 1.8 / 2.4 / 2.5 s.
    ones = percentiles({1.0: 0.0, 2.5: 10.0, math.inf: 10.0})
    assert (ones["p50"], ones["p90"], ones["p99"]) == (2.5, 2.5, 2.5)
    past = percentiles({0.1: 0.0, math.inf: 2.0})                      # past the last bound
    assert past["p50"] is None and past["over"] == 0.1
    assert percentiles({})["p50"] is None


def test_observed_percentiles_are_samples_by_nearest_rank() -> None:
    recs = [{"k": str(i), "s": "slow", "f": 1.0 + i / 1000} for i in range(10)]
    recs += [{"k": "x", "s": "slow", "f": float("nan")}, {"k": "y", "s": "slow", "f": "1"},
             {"k": "z", "s": "slow", "f": -1.0}, {"k": "w", "s": "slow"}]
    p = observed(recs)["slow"]
    assert p["count"] == 10 and p["basis"] == "observed"
    assert (p["p50"], p["p90"], p["p99"]) == (1.004, 1.008, 1.009)
    assert nearest_rank([]) == {"count": 0, "basis": "observed", "p50": None, "p90": None,
                                "p99": None}


def test_filters_are_checked_and_bounded() -> None:
    f = Filters.parse({"source": "items", "state": "stale", "q": "ID=3", "offset": "-4",
                       "limit": "100000"})
    assert (f.source, f.state, f.text, f.offset, f.limit) == ("items", "stale", "id=3", 0,
                                                              1000)
    with pytest.raises(ValueError, match="state must be one of"):
        Filters.parse({"state": "nope"})
    with pytest.raises(ValueError, match="integers"):
        Filters.parse({"limit": "ten"})


@pytest.mark.parametrize("expiry", ["9" * 5000, "\u0661\u0662\u0663", "1" * 13, "", "-1"])
def test_a_session_cookie_with_a_hostile_expiry_is_refused_not_a_crash(expiry: str) -> None:
    # int() of thousands of digits raises: before authentication that was a 500.
    from service.admin.routes import _valid_session

    assert _valid_session(f"{expiry}.forged", "token", 0.0) is False
