"""Per-worker buffered metrics add up exactly once flushed (issue 9, item 2).

A buffered metric and a direct one get the same updates; after :func:`flush` (or the
flusher's own periodic flush, awaited through its event) their exposition is identical.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.observe import metrics
from service.observe.metrics import Buffered


@pytest.fixture
def registries() -> Iterator[tuple[CollectorRegistry, CollectorRegistry]]:
    before = list(metrics._all)
    yield CollectorRegistry(), CollectorRegistry()
    metrics._all[:] = before


def _pair(make: type, name: str, reg: tuple[CollectorRegistry, CollectorRegistry],
          **kw: object) -> tuple[Buffered, Buffered]:
    direct = Buffered(make(name, "help", registry=reg[0], **kw), buffered=False)
    buffered = Buffered(make(name, "help", registry=reg[1], **kw), buffered=True)
    return direct, buffered


def test_buffered_updates_reach_prometheus_only_when_flushed_and_then_exactly(
        registries: tuple[CollectorRegistry, CollectorRegistry],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_ensure_flusher", lambda: None)
    counters = _pair(Counter, "c", registries, labelnames=["source", "result"])
    gauges = _pair(Gauge, "g", registries)
    histograms = _pair(Histogram, "h", registries, labelnames=["cmd"],
                       buckets=(0.001, 0.01, 0.1, 1))
    values = [0.0005, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 1, 2, 0.001] * 50
    for i, v in enumerate(values):
        for m in counters:
            m.labels("s", "hit" if i % 3 else "miss").inc()
        for m in gauges:
            m.inc(2) if i % 2 else m.dec()
        for m in histograms:
            m.labels("get").observe(v)
    buffered = registries[1]
    assert buffered.get_sample_value("c_total", {"source": "s", "result": "hit"}) == 0
    assert buffered.get_sample_value("h_count", {"cmd": "get"}) == 0
    assert buffered.get_sample_value("g") == 0
    metrics.flush()

    def exposition(registry: CollectorRegistry) -> list[str]:
        return [ln for ln in generate_latest(registry).decode().splitlines()
                if "_created" not in ln]

    assert exposition(registries[0]) == exposition(buffered)
    assert buffered.get_sample_value("h_count", {"cmd": "get"}) == len(values)
    metrics.flush()                                   # nothing pending: nothing changes
    assert exposition(registries[0]) == exposition(buffered)


def test_the_flusher_flushes_on_its_own(
        registries: tuple[CollectorRegistry, CollectorRegistry],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_flusher", None)
    monkeypatch.setattr(metrics, "FLUSH_INTERVAL", 0.01)
    counter = Buffered(Counter("c", "help", registry=registries[0]), buffered=True)
    metrics.flushed.clear()
    try:
        counter.inc(3)                                # starts the flusher
        assert metrics.flushed.wait(timeout=10)
        assert registries[0].get_sample_value("c_total") == 3
        counter.inc(2)
    finally:
        metrics.stop_flusher()                        # flushes what is left, then stops
    assert registries[0].get_sample_value("c_total") == 5
