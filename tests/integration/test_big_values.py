"""Large values against a real memcached: readers of one value in one worker share one
read, each get a value of their own around one copy of its bytes, the hub gets a turn
after every piece, and an error of the shared read reaches every reader.

The values here are a few MiB over a 64 KiB item size (dozens of pieces), so the tests
stay fast; ``bench/bigvalues.py`` measures 50 MB through real gunicorn workers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import orjson
import pytest

from service.memcache import chunks, codec
from service.memcache.clients import close_pools, pool_for
from service.memcache.store import MISS, Store
from service.readpath.entry import Entry
from service.readpath.freshness import Windows
from service.readpath.tiers import LocalTier, TwoTier
from tests.conftest import settings_for

pytestmark = [pytest.mark.memcached, pytest.mark.private_memcached]

ITEM_SIZE = 64 * 1024
READERS = 8


@pytest.fixture(autouse=True)
def _fresh_pools() -> Iterator[None]:
    close_pools()
    yield
    close_pools()


@pytest.fixture
def store(memcached: Any) -> Store:
    settings = settings_for([memcached.address], cache={"item_size_max": ITEM_SIZE}).cache
    return Store(pool_for(settings), "big-test", settings.item_size_max)


def http_answer(size: int) -> dict[str, Any]:
    """What an http source caches: the origin's answer, its body as bytes."""
    return {"status": 200, "content_type": "application/octet-stream",
            "body": os.urandom(size)}


def pieces_of(store: Store, value: Any) -> int:
    return math.ceil(len(codec.encode(value)) / store.chunk_size)


def gets(memcached: Any) -> tuple[int, int]:
    stats = memcached.stats()
    return int(stats["get_hits"]), int(stats["get_misses"])


class Ticker:
    """A greenlet that takes every turn of the loop it can: how often it ran, and the
    longest gap between two runs, tell whether the hub kept turning while readers worked."""

    def __init__(self) -> None:
        self.ticks = 0
        self.longest = 0.0
        self._glet = gevent.spawn(self._run)

    def _run(self) -> None:
        last = time.perf_counter()
        while True:
            gevent.sleep(0)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            self.ticks += 1
            last = now

    def stop(self) -> None:
        self._glet.kill()


class Flights(dict[tuple[bytes, bytes], Any]):
    """The worker's table of shared reads, counting the readers that looked in it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = gevent.event.Event()
        self.expected = 0
        self.count = 0

    def get(self, key: Any, default: Any = None) -> Any:
        self.count += 1
        if self.count >= self.expected:
            self.asked.set()
        return super().get(key, default)


@pytest.fixture
def flights(monkeypatch: pytest.MonkeyPatch) -> Flights:
    """Make "concurrent" exact: the first reader's fetch starts only once every reader
    has found the manifest and looked for a shared read (or after 5 s, and then the
    fetch counts below show who did not share)."""
    table = Flights()
    read_pieces = chunks.read_pieces

    def gated(*args: Any) -> list[bytes]:
        table.asked.wait(5)
        return read_pieces(*args)

    monkeypatch.setattr(chunks, "_flights", table)
    monkeypatch.setattr(chunks, "read_pieces", gated)
    return table


def read_concurrently(store: Store, key: str, readers: int = READERS,
                      flights: Flights | None = None) -> list[Any]:
    if flights is not None:
        flights.expected, flights.count = readers, 0
        flights.asked.clear()
    glets = [gevent.spawn(store.get, key) for _ in range(readers)]
    gevent.joinall(glets, timeout=60, raise_error=True)
    assert all(g.ready() for g in glets), "a reader of the large value never finished"
    return [g.value for g in glets]


def test_concurrent_readers_share_one_fetch_and_one_copy_of_the_bytes(
        store: Store, memcached: Any, flights: Flights) -> None:
    value = http_answer(3 * 1024 * 1024)
    assert store.set("big", value)
    n = pieces_of(store, value)
    assert n > 40
    hits_before, _ = gets(memcached)
    ticker = Ticker()
    try:
        values = read_concurrently(store, "big", flights=flights)
    finally:
        ticker.stop()
    hits, _ = gets(memcached)
    # Each reader read the manifest; the pieces were fetched once, not once per reader.
    assert hits - hits_before == READERS + n
    assert all(v == value for v in values)
    # One copy of the body for all of them, but containers of their own: a reader that
    # changes its dict changes nobody else's.
    assert all(v["body"] is values[0]["body"] for v in values)
    assert len({id(v) for v in values}) == READERS
    values[0]["status"] = 500
    assert values[1]["status"] == 200
    # The hub got a turn after every piece (the ticker woke in between). How long each
    # turn waited is timing, measured by bench/bigvalues.py, not asserted here.
    assert ticker.ticks >= n, (ticker.ticks, n)
    print(f"{n} pieces, {ticker.ticks} ticks, longest gap {ticker.longest * 1000:.1f} ms")


def test_a_new_write_is_a_new_read_and_later_readers_fetch_again(
        store: Store, memcached: Any) -> None:
    first, second = http_answer(512 * 1024), http_answer(512 * 1024)
    assert store.set("big", first)
    assert read_concurrently(store, "big", 3) == [first] * 3
    assert store.set("big", second)
    assert read_concurrently(store, "big", 3) == [second] * 3
    assert not chunks._flights  # nothing left behind


def test_every_shape_of_large_value_reads_back_for_every_reader(store: Store) -> None:
    big = os.urandom(300 * 1024)
    shapes: list[Any] = [
        big, "é" * 300_000, list(range(60_000)), {"a": big, "b": (big[:10], big), "c": None},
        Entry.create(http_answer(200 * 1024), 1.0, Windows(60, 600, 3600), 0.1).to_wire(),
    ]
    for index, shape in enumerate(shapes):
        key = f"shape-{index}"
        assert store.set(key, shape)
        assert read_concurrently(store, key, 4) == [shape] * 4, type(shape)


def test_an_error_in_the_shared_read_reaches_every_reader(
        store: Store, memcached: Any, flights: Flights) -> None:
    value = http_answer(1024 * 1024)
    assert store.set("big", value)
    n = pieces_of(store, value)
    # Lose the last piece (an eviction): the shared read fails only after fetching all
    # the others, while every reader waits on it.
    manifest = memcached.raw_get(store.key("big"))
    assert manifest is not None
    chunk_set = orjson.loads(manifest[0][codec.HEADER_LEN:])["id"]
    last = store.key(chunks._chunk_key("big", chunk_set, n - 1))
    assert memcached.command_line(b"delete " + last) == b"DELETED"
    hits_before, misses_before = gets(memcached)
    values = read_concurrently(store, "big", flights=flights)
    hits, misses = gets(memcached)
    assert values == [MISS] * READERS          # each of them: a miss, never a crash
    assert (hits - hits_before, misses - misses_before) == (READERS + n - 1, 1)
    assert not flights


def test_a_large_value_is_turned_away_from_the_local_tier_without_encoding_it(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = Entry.create(http_answer(2 * 1024 * 1024), time.time(), Windows(60, 600, 3600),
                         0.1)
    assert store.set("big", entry.to_wire(), 3600)
    local = LocalTier(100, max_bytes=4 * 1024 * 1024)   # keeps values up to 512 KiB
    tiers = TwoTier(store, local, 2.0, time.monotonic)

    def refuse(value: Any) -> bytes:
        raise AssertionError("a value too large for the local tier was encoded again")

    monkeypatch.setattr(codec, "encode", refuse)
    found = tiers.look("big").found
    assert found is not None and found.entry.value == entry.value
    assert local.get("big") is None


def test_a_large_cached_answer_is_sent_in_pieces_whole_and_validatable(
        memcached: Any, origin_server: Any, make_app: Any) -> None:
    size = 3 * 1024 * 1024 + 5
    source = {"kind": "http", "url": f"{origin_server.url}/big?size={size}",
              "max_age": 60, "stale_while_revalidate": 600, "stale_if_error": 3600}
    app = make_app(settings_for([memcached.address], cache={"item_size_max": ITEM_SIZE},
                                sources={"big": source}))
    cold = app.test_client().get("/v1/big")
    assert cold.status_code == 200 and cold.headers["X-Cache"] == "MISS"
    assert cold.data == b"x" * size

    def read() -> tuple[Any, list[bytes]]:
        answer = app.test_client().get("/v1/big", buffered=False)
        try:
            return answer, list(answer.response)   # what the server is handed, in order
        finally:
            answer.close()

    glets = [gevent.spawn(read) for _ in range(6)]
    gevent.joinall(glets, timeout=60, raise_error=True)
    for glet in glets:
        answer, pieces = glet.get()
        assert answer.status_code == 200 and answer.headers["X-Cache"] == "HIT"
        assert answer.headers["Content-Length"] == str(size)
        assert b"".join(pieces) == b"x" * size
        # A piece at a time, with a turn of the loop between two of them.
        assert len(pieces) == 4 and max(map(len, pieces)) <= 1024 * 1024
    again = app.test_client().get("/v1/big", headers={"If-None-Match": cold.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""


def test_get_many_reads_large_values_beside_small_ones(store: Store, memcached: Any) -> None:
    big = http_answer(700 * 1024)
    assert store.set("big", big) and store.set("small", {"a": 1})
    assert store.get_many(["big", "small", "absent"]) == {"big": big, "small": {"a": 1}}
    # A large value that no longer reads (its pieces lost) is left out, like an absent one.
    memcached.flush()
    assert store.set("small", 2)
    manifest = codec.header(codec.KIND_CHUNKED) + orjson.dumps(
        {"id": "gone", "n": 2, "len": 10, "sha256": "00"})
    memcached.raw_set(store.key("big"), manifest)
    assert store.get_many(["big", "small"]) == {"small": 2}


def test_a_large_entry_written_is_encoded_once_and_not_kept_locally(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    local = LocalTier(100, max_bytes=4 * 1024 * 1024)   # keeps values up to 512 KiB
    tiers = TwoTier(store, local, 2.0, time.monotonic)
    claim = tiers.look("big", vivify=30).claim
    assert claim is not None
    entry = Entry.create(http_answer(2 * 1024 * 1024), time.time(), Windows(60, 600, 3600),
                         0.1)
    encode = codec.encode
    calls: list[int] = []

    def counted(value: Any, join: Any = None) -> bytes:
        data = encode(value, join)
        calls.append(len(data))
        return data

    monkeypatch.setattr(codec, "encode", counted)
    assert tiers.write("big", entry, claim) == "HD"
    assert len(calls) == 1           # for memcached only: its size turns the local tier away
    assert local.get("big") is None
    monkeypatch.undo()
    found = tiers.look("big").found
    assert found is not None and found.entry.value == entry.value
