"""Key mapping and the safe value format: pure functions, no memcached."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from flask import Response

from service.errors import CodecError
from service.memcache import codec
from service.memcache.keys import MAX_KEY_LENGTH, memcached_key

ODD_KEYS = [
    "plain", "with space", "cr\rlf\n", "nul\x00byte", "tab\tkey", "ünïcödé ключ 键",
    "emoji 🦄", "x" * 10_000, "", "\x7f", "a:h:b", "\udcff lone surrogate",
]


def legal(key: bytes) -> bool:
    return len(key) <= MAX_KEY_LENGTH and all(33 <= b < 127 for b in key)


@pytest.mark.parametrize("key", ODD_KEYS)
def test_every_key_maps_to_a_legal_memcached_key(key: str) -> None:
    assert legal(memcached_key("svc", key))
    assert legal(memcached_key("svc", key.encode("utf-8", "surrogatepass")))


def test_distinct_keys_stay_distinct_and_plain_keys_stay_readable() -> None:
    mapped = {memcached_key("svc", k) for k in ODD_KEYS}
    assert len(mapped) == len(ODD_KEYS)
    assert memcached_key("svc", "user:42") == b"svc:k:user:42"
    # A readable key that looks like a hashed one cannot collide with it.
    hashed = memcached_key("svc", "with space").decode()
    assert memcached_key("svc", hashed.split(":", 1)[1]) != hashed.encode()
    # Long keys are hashed, not truncated: two long keys sharing a 250-byte prefix differ.
    assert memcached_key("svc", "y" * 300 + "a") != memcached_key("svc", "y" * 300 + "b")


VALUES: list[Any] = [
    None, True, False, 0, -1, 2**70, -(2**70), 1.5, float("inf"), float("-inf"),
    "text", "ünï\x00code", b"\x00\xffbytes", bytearray(b"ba"), [1, [2, [3]]], (1, (2, "x")),
    {"a": 1, "b": [1, 2]}, {1: "int key", (1, 2): "tuple key"}, {"\x00t": "looks like a tag"},
    ("body", 201, {"X-A": "1"}), [b"bytes in list", (None,)],
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_round_trip_exactly(value: Any) -> None:
    decoded = codec.decode(codec.encode(value))
    expected = bytes(value) if isinstance(value, bytearray) else value
    assert decoded == expected
    assert type(decoded) is type(expected)


def test_nan_round_trips() -> None:
    decoded = codec.decode(codec.encode(float("nan")))
    assert decoded != decoded


def test_flask_response_round_trips() -> None:
    original = Response(b'{"a": 1}', status=203, mimetype="application/json")
    original.headers["X-Custom"] = "yes"
    decoded = codec.decode(codec.encode(original))
    assert isinstance(decoded, Response)
    assert decoded.status_code == 203
    assert decoded.get_data() == b'{"a": 1}'
    assert decoded.headers["X-Custom"] == "yes"
    assert decoded.mimetype == "application/json"


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, ("1/0",))


@pytest.mark.parametrize("data", [
    pickle.dumps({"a": 1}), pickle.dumps(Exploit()), b"", b"garbage", b"\x00sw",
    codec.MAGIC + bytes([codec.VERSION + 1]) + b"j{}",    # a future format version
    codec.MAGIC + bytes([codec.VERSION]) + b"z{}",        # an unknown kind
    codec.MAGIC + bytes([codec.VERSION]) + b"j{not json",
    codec.MAGIC + bytes([codec.VERSION]) + b"t" + b'{"\\u0000b": "!!notbase64"}',
    codec.MAGIC + bytes([codec.VERSION]) + b"t" + b'{"\\u0000q": 1}',
    codec.MAGIC + bytes([codec.VERSION]) + b"s\xff\xfe",
    codec.MAGIC + bytes([codec.VERSION]) + b"j" + b"[" * 5000,
])
def test_foreign_bytes_are_refused_not_executed(data: bytes) -> None:
    with pytest.raises(CodecError):
        codec.decode(data)


def test_unencodable_value_names_its_type() -> None:
    with pytest.raises(CodecError, match="object"):
        codec.encode({"x": object()})
