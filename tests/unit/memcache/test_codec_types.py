"""The codec's types: each comes back as the same type and value, or is refused by name.

Also the class registry (decoding resolves no name it was not given by this process) and
hostile input (decoding raises nothing but CodecError).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import random
import sys
import typing
import uuid
from collections import Counter, OrderedDict, defaultdict, namedtuple
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import pytest
from flask import Response
from markupsafe import Markup

from service.errors import CodecError
from service.memcache import codec


def _zone(key: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(key)
    except ZoneInfoNotFoundError:
        return None


PARIS = _zone("Europe/Paris")
needs_tzdata = pytest.mark.skipif(PARIS is None, reason="no time zone database")


# ---- types carried by class: module level, so their module:qualname is stable ------

class Color(enum.Enum):
    RED = "r"
    GREEN = "g"
    CRIMSON = "r"  # an alias: comes back as RED, the member it names


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(enum.StrEnum):
    READ = "read"


class Perm(enum.Flag):
    R = 1
    W = 2


class Point(typing.NamedTuple):
    x: int
    y: Any = None


Pair = namedtuple("Pair", "left right")


@dataclasses.dataclass
class Item:
    name: str
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class Frozen:
    at: datetime
    where: Point


CONSTRUCTED: list[str] = []


@dataclasses.dataclass
class Audited:
    """__post_init__ has a side effect and computes an init=False field."""

    price: Decimal
    qty: int
    total: Decimal = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        CONSTRUCTED.append(f"{self.price}x{self.qty}")
        self.total = self.price * self.qty


@dataclasses.dataclass
class WithCache:
    n: int

    @functools.cached_property
    def double(self) -> int:
        return self.n * 2


@dataclasses.dataclass
class Unseen:  # never encoded here: only the registry test registers it
    x: int


@dataclasses.dataclass
class NotEncodedEither:
    x: int


# ---- round trips ------------------------------------------------------------------------

def assert_same(a: Any, b: Any) -> None:
    """Same type all the way down, equal values, and what == ignores (tzinfo, fold, digits)."""
    assert type(b) is type(a), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb)
            assert_same(va, vb)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, set | frozenset):
        assert sorted(map(repr, a)) == sorted(map(repr, b))
    elif isinstance(a, Decimal):
        assert str(a) == str(b)  # exact digits, sign of zero, NaN and sNaN
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif isinstance(a, datetime | time):
        assert (a, a.fold, a.tzinfo) == (b, b.fold, b.tzinfo)
        assert a.tzname() == b.tzname() and a.utcoffset() == b.utcoffset()
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    else:
        assert a == b


def round_trip(value: Any) -> Any:
    out = codec.decode(codec.encode(value))
    assert_same(value, out)
    return out


UTC_NOON = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
TYPED: list[Any] = [
    # datetime: naive, UTC, fixed offsets (named, to the microsecond), extremes
    datetime(2024, 3, 1, 12, 30), UTC_NOON,
    datetime(2024, 3, 1, 12, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(2024, 3, 1, tzinfo=timezone(timedelta(hours=-3), "BRT")),
    datetime(2024, 3, 1, tzinfo=timezone(timedelta(seconds=1, microseconds=7))),
    datetime.min, datetime.max, datetime(2024, 1, 1, fold=1),
    date(2024, 2, 29), date.min, date.max,
    time(23, 59, 59, 999999), time(0, 0), time(1, 2, tzinfo=UTC),
    time(1, 2, fold=1, tzinfo=timezone(-timedelta(hours=1), "X")),
    timedelta(0), timedelta(days=-1, microseconds=1), timedelta.max, timedelta.min,
    Decimal("1.10"), Decimal("-0"), Decimal("0E-7"), Decimal("NaN"), Decimal("-Infinity"),
    Decimal("sNaN"), Decimal("3.14159265358979323846264338327950288419716939937510"),
    Decimal("1E+4300"), Decimal("-1E-4300"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.UUID(int=2**128 - 1),
    {1, "a", (2, 3), frozenset({4}), None}, set(), frozenset({"x", b"y"}), frozenset(),
    OrderedDict([("b", 1), ("a", [2])]), OrderedDict([(1, "int key")]), OrderedDict(),
    Markup("<b>bold</b>"), Markup(""),
    (1, (2, "x")), (), b"\x00\xff", 2**64, -(2**63) - 1, 2**64 - 1, float("inf"),
    True, [True, 1, 1.0, None],
    Color.RED, Color.CRIMSON, Level.HIGH, Mode.READ, Perm.W,
    Point(1, "y"), Point(2), Pair(Point(1, 2), [Level.LOW]),
    Item("a", ["b"]), Frozen(UTC_NOON, Point(3)),
]


@pytest.mark.parametrize("value", TYPED, ids=repr)
def test_each_type_comes_back_as_itself(value: Any) -> None:
    round_trip(value)


@pytest.mark.parametrize("value", TYPED, ids=repr)
def test_each_type_comes_back_as_itself_when_nested(value: Any) -> None:
    round_trip({"k": value, "in list": [value], "in tuple": (value,)})
    round_trip([{"deep": [(value, {"again": value})]}])
    round_trip(Item("holder", [value]))


@needs_tzdata
def test_zoneinfo_datetimes_keep_their_zone_and_fold() -> None:
    # 02:30 on 2023-10-29 happens twice in Paris; fold=1 is the second time, after DST.
    first = datetime(2023, 10, 29, 2, 30, tzinfo=PARIS)
    second = first.replace(fold=1)
    for value in (first, second, time(8, tzinfo=PARIS), datetime(2024, 7, 1, tzinfo=PARIS)):
        out = round_trip(value)
        assert out.tzinfo is PARIS
    assert round_trip(second).utcoffset() == timedelta(hours=1) != first.utcoffset()


def test_utc_comes_back_as_the_utc_singleton() -> None:
    assert codec.decode(codec.encode(UTC_NOON)).tzinfo is UTC


def test_markup_stays_markup_so_it_is_not_escaped_again() -> None:
    out = codec.decode(codec.encode({"html": Markup("<b>x</b>")}))["html"]
    assert out + "<" == "<b>x</b>&lt;"  # a plain str would not escape the "<"


def test_int_enum_is_not_an_int_and_alias_is_its_member() -> None:
    assert codec.decode(codec.encode([Level.HIGH]))[0] is Level.HIGH
    assert codec.decode(codec.encode(Color.CRIMSON)) is Color.RED


def test_plain_values_take_the_one_orjson_call_path() -> None:
    plain: list[Any] = [{"a": 1, "b": [1.5, "x", None, True, {"c": []}]}, list(range(100)),
                        [0.5, 2.5], [2**64 - 1, -(2**63)], {"\x00t": "looks like a tag"}, 7]
    for value in plain:
        assert codec.kind_of(codec.encode(value)) == codec.KIND_JSON, value
    tagged: list[Any] = [[1, (2,)], {"a": float("nan")}, [0.5, float("inf")], [2**64],
                         {1: "x"}, {"a": Level.LOW}, [True, Level.LOW], {"a": Markup("m")}]
    for value in tagged:
        assert codec.kind_of(codec.encode(value)) == codec.KIND_TAGGED, value
        round_trip(value)


def test_equal_sets_encode_alike_whatever_their_iteration_order() -> None:
    a, b = {0, 8}, set()
    b.add(8)
    b.add(0)
    assert list(a) != list(b)  # the precondition: same set, different iteration order
    assert codec.encode(a) == codec.encode(b)
    assert codec.encode(frozenset(a)) == codec.encode(frozenset(b))


# ---- the class registry ----------------------------------------------------------------

def test_dataclass_is_rebuilt_without_running_its_constructor() -> None:
    value = Audited(Decimal("2.50"), 3)
    value.total = Decimal("7.00")  # changed after construction: the stored state wins
    before = list(CONSTRUCTED)
    out = codec.decode(codec.encode(value))
    assert type(out) is Audited and out == value and out.total == Decimal("7.00")
    assert CONSTRUCTED == before  # __post_init__ did not run again


def test_frozen_slotted_dataclass_round_trips() -> None:
    out = round_trip(Frozen(UTC_NOON, Point(1, 2)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.at = UTC_NOON  # type: ignore[misc]


def test_cached_property_is_dropped_and_recomputed() -> None:
    value = WithCache(4)
    assert value.double == 8  # now cached in value.__dict__
    out = codec.decode(codec.encode(value))
    assert out == value and "double" not in vars(out) and out.double == 8


def blob(tree: Any) -> bytes:
    return codec.header(codec.KIND_TAGGED) + orjson.dumps(tree)


def test_unregistered_class_is_refused_with_the_register_hint() -> None:
    name = f"{__name__}:Unseen"
    data = blob({"\x00c": [name, {"x": 1}]})
    with pytest.raises(CodecError, match=r"service\.codec\.register\(Unseen\)"):
        codec.decode(data)
    assert codec.register(Unseen) is Unseen
    assert codec.decode(data) == Unseen(1) and type(codec.decode(data)) is Unseen


def test_register_works_as_a_decorator_and_for_each_kind() -> None:
    @codec.register
    @dataclasses.dataclass
    class Local:
        x: int

    name = f"{__name__}:{Local.__qualname__}"
    assert codec.decode(blob({"\x00c": [name, {"x": 1}]})) == Local(1)
    for cls in (Color, Point, Pair):
        assert codec.register(cls) is cls


@pytest.mark.parametrize("tree", [
    {"\x00c": ["this:Zen", {}]},                  # importing `this` would print the Zen
    {"\x00e": ["this:Zen", "x"]},
    {"\x00N": ["this:Zen", []]},
    {"\x00c": ["os:system", {"command": "true"}]},
    {"\x00c": [f"{__name__}:NotEncodedEither", {"x": 1}]},  # exists, but not registered
])
def test_decoding_never_imports_or_resolves_a_name(tree: Any) -> None:
    with pytest.raises(CodecError, match="register"):
        codec.decode(blob(tree))
    assert "this" not in sys.modules


@pytest.mark.parametrize("tree", [
    {"\x00e": [f"{__name__}:Item", "RED"]},           # a dataclass named as an enum
    {"\x00N": [f"{__name__}:Color", [1]]},
    {"\x00c": [f"{__name__}:Item", {"name": "a"}]},   # a field missing (another release)
    {"\x00c": [f"{__name__}:Item", {"name": "a", "tags": [], "extra": 1}]},
    {"\x00c": [f"{__name__}:Item", [["name", "a"]]]},
    {"\x00N": [f"{__name__}:Point", [1, 2, 3]]},
    {"\x00e": [f"{__name__}:Color", "BLUE"]},
    {"\x00e": [f"{__name__}:Color", 1]},
    {"\x00e": [f"{__name__}:Color"]},
])
def test_registered_class_with_a_wrong_payload_is_refused(tree: Any) -> None:
    codec.encode([Item("a"), Color.RED, Point(1)])  # registers them
    with pytest.raises(CodecError):
        codec.decode(blob(tree))


def test_another_class_of_the_same_name_is_refused() -> None:
    def make() -> type:
        @dataclasses.dataclass
        class Twin:
            x: int
        return Twin

    first, second = make(), make()
    codec.decode(codec.encode(first(1)))
    with pytest.raises(CodecError, match="already registered"):
        codec.encode(second(1))


@pytest.mark.parametrize("cls", [dict, int, Counter, type("Plain", (), {})])
def test_register_refuses_what_is_not_carried_by_class(cls: type) -> None:
    with pytest.raises(CodecError, match="cannot register"):
        codec.register(cls)


# ---- refusals at encode time ------------------------------------------------------------

class MyStr(str):
    pass


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyDict(dict[str, int]):
    pass


class MyList(list[int]):
    pass


class MyTuple(tuple[int, ...]):
    pass


class Obj:
    def __init__(self) -> None:
        self.a = 1


class MyDateTime(datetime):
    pass


class FakeTZ(tzinfo):  # pytz and dateutil zones are tzinfo subclasses like this one
    def utcoffset(self, dt: datetime | None) -> timedelta:
        return timedelta(hours=1)


@dataclasses.dataclass
class Extra:
    x: int

    def __post_init__(self) -> None:
        self.helper = {}  # not a field: it would be lost


@dataclasses.dataclass
class NewDataclass:
    x: int

    def __new__(cls, *args: Any, **kwargs: Any) -> NewDataclass:
        return super().__new__(cls)


class PointSub(Point):  # a NamedTuple subclass without __slots__ has a __dict__
    pass


def _point_sub_with_attr() -> PointSub:
    p = PointSub(1)
    p.note = "lost"  # type: ignore[attr-defined]
    return p


@pytest.mark.parametrize(("value", "named"), [
    (defaultdict(list), "defaultdict"), (Counter("aab"), "Counter"), (MyStr("s"), "MyStr"),
    (MyInt(1), "MyInt"), (MyFloat(1.0), "MyFloat"), (MyDict(a=1), "MyDict"),
    (MyList([1]), "MyList"), (MyTuple((1,)), "MyTuple"), (Obj(), "Obj"), (object(), "object"),
    (MyDateTime(2024, 1, 1), "MyDateTime"), (datetime(2024, 1, 1, tzinfo=FakeTZ()), "FakeTZ"),
    (time(1, tzinfo=FakeTZ()), "FakeTZ"), (Extra(1), "helper"), (NewDataclass(1), "NewDataclass"),
    (Perm.R | Perm.W, "Perm"), (_point_sub_with_attr(), "PointSub"), (Item, "builtins.type"),
    (Decimal("1E+4301"), "Decimal"), (Decimal("1" * 4400), "Decimal"), (10**5000, "int"),
    (lambda: 1, "function"), (iter([]), "iterator"), (range(3), "range"),
], ids=lambda v: type(v).__name__ if not isinstance(v, str) else v)
def test_what_would_degrade_is_refused_naming_its_type(value: Any, named: str) -> None:
    with pytest.raises(CodecError, match=named):
        codec.encode(value)
    with pytest.raises(CodecError, match=named):
        codec.encode({"nested": [value]})


def test_subclass_as_dict_key_is_refused_too() -> None:
    with pytest.raises(CodecError, match="MyStr"):
        codec.encode({MyStr("k"): 1})


def test_self_reference_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(CodecError, match="nested too deeply"):
        codec.encode(loop)
    with pytest.raises(CodecError, match="nested too deeply"):
        codec.encode([(1,), loop])


def test_bool_stays_bool_and_int_stays_int() -> None:
    out = codec.decode(codec.encode([True, 1, (False, 0), {True: 1}]))
    assert [type(x) for x in out] == [bool, int, tuple, dict]
    assert [type(x) for x in out[2]] == [bool, int] and type(next(iter(out[3]))) is bool


def test_a_streamed_response_is_refused() -> None:
    with pytest.raises(CodecError, match="streamed"):
        codec.encode(Response(iter([b"a"])))


# ---- hostile input ----------------------------------------------------------------------

HOSTILE: list[Any] = [
    {"\x00T": 5}, {"\x00T": ["2024-01-01", 0]}, {"\x00T": ["not a date", 0, None]},
    {"\x00T": ["2024-13-01T00:00", 0, None]}, {"\x00T": ["2024-01-01", 2, None]},
    {"\x00T": ["2024-01-01", True, None]},
    {"\x00T": ["2024-01-01", 0, [25 * 3600 * 10**6, None]]},
    {"\x00T": ["2024-01-01", 0, [0, 5]]}, {"\x00T": ["2024-01-01", 0, [0.5, None]]},
    {"\x00T": ["2024-01-01", 0, "../../../etc/passwd"]},
    {"\x00T": ["2024-01-01", 0, "/etc/passwd"]},
    {"\x00T": ["2024-01-01", 0, "No/Such_Zone"]}, {"\x00T": ["2024-01-01", 0, "zone.tab"]},
    {"\x00T": ["2024-01-01", 0, "a\x00b"]}, {"\x00T": ["2024-01-01", 0, {"k": 1}]},
    {"\x00H": ["25:00", 0, None]}, {"\x00D": "2024-02-30"}, {"\x00D": 20240101},
    {"\x00p": [10**10, 0, 0]}, {"\x00p": [1.5, 0, 0]}, {"\x00p": "1 day"}, {"\x00p": [1]},
    {"\x00n": "1e999999999"}, {"\x00n": "-1E-999999999"}, {"\x00n": "9" * 1_000_000},
    {"\x00n": "one"}, {"\x00n": 1.5}, {"\x00u": "not-a-uuid"}, {"\x00u": 5},
    {"\x00b": "!!notbase64"}, {"\x00b": ["a"]}, {"\x00m": 1}, {"\x00i": "9" * 5000},
    {"\x00i": 5}, {"\x00i": "0x10"}, {"\x00f": "lots"}, {"\x00f": 1.5},
    {"\x00s": [[1]]}, {"\x00s": "abc"}, {"\x00z": [{"a": 1}]}, {"\x00d": [[[1], 2]]},
    {"\x00d": [[1]]}, {"\x00d": "ab"}, {"\x00o": [[1, 2, 3]]}, {"\x00t": "abc"}, {"\x00t": 1},
    {"\x00r": []}, {"\x00r": {"status": 200, "headers": [], "body": 5}},
    {"\x00r": {"status": "200", "headers": [], "body": ""}},
    {"\x00r": {"status": 200, "headers": [["X-A", "1\r\nSet-Cookie: a=b"]], "body": ""}},
    {"\x00r": {"status": 200, "headers": [["X-A"]], "body": ""}}, {"\x00r": {"status": 200}},
    {"\x00c": 5}, {"\x00c": [1, {}]}, {"\x00e": ["x"]}, {"\x00N": None},
    {"\x00": 1}, {"\x00unknown": 1}, {"\x00q": 1},
    [{"\x00t": [{"\x00s": [[1]]}]}],
    {"\x00t": [{"\x00t": []}, {"\x00n": "1e9999999"}]},
]


@pytest.mark.parametrize("tree", HOSTILE, ids=lambda t: repr(t)[:60])
def test_hostile_tag_payloads_raise_codec_error_only(tree: Any) -> None:
    with pytest.raises(CodecError):
        codec.decode(blob(tree))


@pytest.mark.parametrize("depth", [300, 1000, 100_000])
def test_deep_nesting_raises_codec_error_only(depth: int) -> None:
    # 1000 levels is valid JSON for orjson (its limit is 1024) but deeper than our stack;
    # 100 000 is beyond orjson's. Built by hand: orjson will not write over 255 levels.
    tuples = b'{"\\u0000t":[' * (depth // 2) + b"1" + b"]}" * (depth // 2)
    lists = b"[" * depth + b"]" * depth
    for raw in (tuples, lists):
        data = codec.header(codec.KIND_TAGGED) + raw
        if depth == 300:
            assert codec.decode(data) is not None
        else:
            with pytest.raises(CodecError):
                codec.decode(data)


def test_an_unreadable_zone_file_is_a_codec_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(key: str) -> ZoneInfo:
        raise PermissionError(13, "Permission denied", key)

    monkeypatch.setattr(codec, "ZoneInfo", unreadable)
    with pytest.raises(CodecError, match="unreadable time zone"):
        codec.decode(blob({"\x00T": ["2024-01-01", 0, "Europe/Paris"]}))


def test_hostile_decimal_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(CodecError, match="4300"):
        codec.decode(blob({"\x00n": "9" * 10_000_000}))


CORPUS: list[Any] = [
    TYPED, {"items": [Item("a", ["b"]), Audited(Decimal("1.5"), 2)], "at": UTC_NOON},
    {1: (Point(1, Color.RED), {frozenset({1}): OrderedDict(a=Markup("<i>"))})},
    Response(b"body", 201, headers={"X-A": "1"}), [uuid.UUID(int=1), timedelta(1), 2**80],
]


def mutations(rng: random.Random, data: bytes) -> bytes:
    head, body = data[: codec.HEADER_LEN], bytearray(data[codec.HEADER_LEN :])
    for _ in range(rng.randint(1, 4)):
        op, at = rng.random(), rng.randrange(len(body) + 1)
        if op < 0.4 and body:
            body[min(at, len(body) - 1)] ^= 1 << rng.randrange(8)
        elif op < 0.6:
            body[at:at] = rng.choice([b'"', b"[", b"]", b"{", b"}", b",", b"0", b"\\u0000",
                                      b"9" * 20, b"null", b"-", b"e999"])
        elif op < 0.8:
            del body[at : at + rng.randint(1, 8)]
        else:
            del body[at:]
    return head + bytes(body)


JUNK: list[Any] = [None, True, 0, -1, 2**63 - 1, 1.5, "", "x", "\x00t", [], {}, [1, 2],
                   {"\x00t": 1}, ["2024-01-01", 0, None], "1e999999", [[1, 2]], {"a": []}]


def mutate_tree(rng: random.Random, node: Any) -> Any:
    """Replace one random node of a decoded payload with junk, keeping the rest intact."""
    if isinstance(node, list) and node and rng.random() < 0.8:
        i = rng.randrange(len(node))
        return [*node[:i], mutate_tree(rng, node[i]), *node[i + 1 :]]
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(list(node))
        return {**node, key: mutate_tree(rng, node[key])}
    return rng.choice(JUNK)


def test_fuzzed_encodings_decode_to_a_value_or_codec_error() -> None:
    rng = random.Random(20240301)
    encodings = [codec.encode(value) for value in CORPUS]
    trees = [orjson.loads(e[codec.HEADER_LEN :]) for e in encodings]
    outcomes = Counter[str]()
    for _ in range(3000):
        if rng.random() < 0.5:
            data = mutations(rng, rng.choice(encodings))
        else:
            data = blob(mutate_tree(rng, rng.choice(trees)))
        try:
            codec.decode(data)
            outcomes["value"] += 1
        except CodecError:
            outcomes["refused"] += 1
    # Both outcomes happen, so the mutations are neither all harmless nor all fatal.
    assert outcomes["value"] > 100 and outcomes["refused"] > 100, outcomes
