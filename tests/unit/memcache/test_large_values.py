"""Large values without memcached: the framed format, decoding from pieces, and how the
readers of one shared read are served (pure coordination, with a stand-in connection)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gevent.event
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import CacheUnavailable, CodecError
from service.memcache import chunks, codec

BIG = os.urandom(codec.OUT_OF_LINE + 123)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def join(parts: list[bytes]) -> bytes:
    return b"".join(parts)


def test_small_values_keep_their_kinds() -> None:
    # Below OUT_OF_LINE nothing changes: the hot path writes and reads what it did.
    assert codec.kind_of(codec.encode({"a": 1})) == codec.KIND_JSON
    assert codec.kind_of(codec.encode({"body": b"x" * 1000})) == codec.KIND_TAGGED
    assert codec.kind_of(codec.encode(b"x" * 10 * codec.OUT_OF_LINE)) == codec.KIND_BYTES


def test_a_large_bytes_leaf_is_written_raw_after_small_json() -> None:
    value = {"status": 200, "body": BIG}
    data = codec.encode(value)
    assert codec.kind_of(data) == codec.KIND_FRAMED
    assert len(data) < len(BIG) + 200            # no base64: a third smaller
    assert codec.decode(data) == value


def test_equal_sets_of_large_bytes_encode_alike() -> None:
    a, b = os.urandom(codec.OUT_OF_LINE), os.urandom(codec.OUT_OF_LINE)
    assert codec.encode({a, b}) == codec.encode({b, a})
    assert codec.decode(codec.encode(frozenset({a, b}))) == frozenset({a, b})


VALUES: list[Any] = [
    BIG, "é" * 40_000, {"body": BIG, "pair": (BIG[:5], BIG), "n": None},
    [1, 2, {"x": BIG}], list(range(5000)), {1: BIG},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("size", [1, 7, 4096, 10**9])
def test_prepared_from_pieces_reads_back_for_each_reader(value: Any, size: int) -> None:
    prepared = codec.prepare(split(codec.encode(value), size), join)
    first, second = prepared.value(), prepared.value()
    assert first == value and second == value
    if isinstance(value, dict):
        assert first is not second            # containers of their own
        assert first["body" if "body" in value else 1] is second[
            "body" if "body" in value else 1]  # one copy of the large bytes


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_garbage_framed_values_are_codec_errors_only(tail: bytes, size: int) -> None:
    data = codec.header(codec.KIND_FRAMED) + tail
    with pytest.raises(CodecError):
        codec.decode(data)
        raise CodecError("decoded")  # garbage that decodes is fine too
    with pytest.raises(CodecError):
        codec.prepare(split(data, size), join).value()
        raise CodecError("decoded")


def test_a_leaf_pointing_beyond_its_frame_is_refused() -> None:
    data = bytearray(codec.encode({"body": BIG}))
    with pytest.raises(CodecError):
        codec.decode(bytes(data[:-1]))
    with pytest.raises(CodecError):
        codec.prepare(split(bytes(data[:-1]), 1000), join).value()
    # The out-of-line tag outside a framed value is somebody else's bytes.
    with pytest.raises(CodecError):
        codec.decode(codec.header(codec.KIND_TAGGED) + b'{"\\u0000B":[0,1]}')


# ---- the shared read ----------------------------------------------------------------------


class Pieces:
    """A stand-in connection holding one chunked value; ``gate`` holds its first fetch."""

    def __init__(self, value: Any, fail: BaseException | None = None) -> None:
        self.data = codec.encode(value)
        self.store: dict[bytes, bytes] = {}
        self.manifest = b""
        self.fetches = 0
        self.gate = gevent.event.Event()
        self.fail = fail

    def write(self) -> None:
        self.gate.set()
        self.manifest = chunks.write_chunks(self, self.key_of, "k", self.data, 60, 1000)  # type: ignore[arg-type]
        self.gate.clear()

    @staticmethod
    def key_of(key: str) -> bytes:
        return key.encode("utf-8", "backslashreplace")

    def server_for(self, key: bytes) -> str:
        return "one"

    def call(self, server: str, command: str, fn: Any) -> Any:
        if command == "set":
            return fn(self)
        self.gate.wait(5)
        self.fetches += 1
        if self.fail is not None:
            raise self.fail
        return fn(self)

    def set(self, key: bytes, piece: bytes, exp: int) -> bool:
        self.store[key] = piece
        return True

    def get(self, key: bytes) -> bytes | None:
        return self.store.get(key)


@pytest.fixture
def pooled(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Pieces]]:
    """``chunks.borrow`` hands out the stand-in in ``pooled[0]``."""
    holder: list[Pieces] = []

    @contextmanager
    def borrow(pool: Any) -> Iterator[Pieces]:
        yield holder[0]

    monkeypatch.setattr(chunks, "borrow", borrow)
    yield holder
    assert not chunks._flights


def read_all(source: Pieces, readers: int) -> list[gevent.Greenlet]:
    glets = [gevent.spawn(chunks.read_value, None, source.key_of, "k",  # type: ignore[arg-type]
                          source.manifest) for _ in range(readers)]
    gevent.sleep(0)           # every reader is now in the shared read or waiting on it
    source.gate.set()
    gevent.joinall(glets, timeout=10)
    assert all(g.ready() for g in glets)
    return glets


def test_readers_of_one_manifest_share_one_fetch(pooled: list[Pieces]) -> None:
    value = {"body": BIG, "status": 200}
    source = Pieces(value)
    source.write()
    pooled.append(source)
    glets = read_all(source, 6)
    values = [g.get() for g in glets]
    assert values == [value] * 6
    assert source.fetches == len(source.store)          # each piece once
    assert len({id(v) for v in values}) == 6
    assert all(v["body"] is values[0]["body"] for v in values)


@pytest.mark.parametrize("error", [CacheUnavailable("memcached went away"),
                                   CodecError("a piece is gone")])
def test_an_error_of_the_shared_read_reaches_every_reader(pooled: list[Pieces],
                                                          error: Exception) -> None:
    source = Pieces({"body": os.urandom(5000)}, fail=error)
    source.write()
    pooled.append(source)
    glets = read_all(source, 5)
    assert [type(g.exception) for g in glets] == [type(error)] * 5
    assert source.fetches == 1


def test_a_killed_reader_does_not_kill_the_others(pooled: list[Pieces]) -> None:
    source = Pieces({"body": os.urandom(5000)})
    source.write()
    pooled.append(source)
    glets = [gevent.spawn(chunks.read_value, None, source.key_of, "k",  # type: ignore[arg-type]
                          source.manifest) for _ in range(4)]
    gevent.sleep(0)
    glets[0].kill()             # the one fetching, as a timeout from outside would
    gevent.joinall(glets, timeout=10)
    assert all(g.ready() for g in glets)
    assert [type(g.exception) for g in glets[1:]] == [CacheUnavailable] * 3
    source.gate.set()
    # The next reader starts a read of its own.
    again = chunks.read_value(None, source.key_of, "k", source.manifest)  # type: ignore[arg-type]
    assert again == codec.decode(source.data)


def test_the_hub_gets_a_turn_after_every_piece(pooled: list[Pieces]) -> None:
    source = Pieces({"body": BIG})
    source.write()
    source.gate.set()
    pooled.append(source)
    turns = 0

    def tick() -> None:
        nonlocal turns
        while True:
            gevent.sleep(0)
            turns += 1

    ticker = gevent.spawn(tick)
    gevent.sleep(0)         # the ticker is waiting for its next turn
    try:
        before = turns
        # The stand-in never yields on I/O: every turn the ticker gets is one the read gave.
        assert chunks.read_value(None, source.key_of, "k", source.manifest  # type: ignore[arg-type]
                                 ) == {"body": BIG}
        assert turns - before >= len(source.store)
    finally:
        ticker.kill()
