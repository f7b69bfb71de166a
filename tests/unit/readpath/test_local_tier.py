"""The in-process tier is bounded in entries and in bytes (issue 9, item 4)."""

from __future__ import annotations

from service.readpath.entry import Entry
from service.readpath.freshness import Windows
from service.readpath.tiers import ENTRY_OVERHEAD, LocalTier

W = Windows(60)


def entry(value: object) -> Entry:
    return Entry.create(value, 1000.0, W, 0.0)


def test_bounded_by_entries() -> None:
    tier = LocalTier(max_entries=3, max_bytes=10**9)
    for i in range(5):
        tier.put(f"k{i}", entry(i), 0.0)
    assert len(tier) == 3 and tier.get("k0") is None and tier.get("k4") is not None


def test_bounded_by_bytes_evicting_the_least_recently_used() -> None:
    value = "x" * 1000
    tier = LocalTier(max_entries=1000, max_bytes=10 * (1000 + ENTRY_OVERHEAD + 20))
    for i in range(8):
        tier.put(f"k{i}", entry(value), 0.0)
    assert tier.get("k0") is not None          # k0 becomes the most recently used
    for i in range(8, 30):
        tier.put(f"k{i}", entry(value), 0.0)
    assert tier.bytes <= tier.max_bytes
    assert 0 < len(tier) <= 10
    assert tier.get("k1") is None and tier.get("k29") is not None
    assert tier.bytes == sum(item.size for item in tier._items.values())


def test_a_value_over_an_eighth_of_the_budget_is_not_kept_and_drops_the_old_copy() -> None:
    tier = LocalTier(max_entries=10, max_bytes=80_000)
    tier.put("k", entry("small"), 0.0)
    tier.put("k", entry("y" * 20_000), 0.0)
    assert tier.get("k") is None and tier.bytes == 0


def test_rendered_answers_count_and_go_with_their_entry() -> None:
    tier = LocalTier(max_entries=10, max_bytes=10**6)
    tier.put("k", entry("v"), 0.0)
    item = tier.get("k")
    assert item is not None
    before = tier.bytes
    tier.attach("k", item, ("rendered",), 500)
    assert tier.bytes == before + 500 and item.rendered == ("rendered",)
    tier.put("k", entry("w"), 0.0)               # a new entry: nothing rendered yet
    fresh = tier.get("k")
    assert fresh is not None and fresh.rendered is None
    tier.attach("k", item, ("stale",), 500)      # the old item is no longer the entry
    assert fresh.rendered is None
    tier.delete("k")
    assert tier.bytes == 0


def test_zero_bytes_disables_the_tier() -> None:
    tier = LocalTier(max_entries=10, max_bytes=0)
    tier.put("k", entry(1), 0.0)
    assert len(tier) == 0
