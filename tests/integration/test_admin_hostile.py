"""Hostile numbers in the admin's own items are garbage, never a 500.

The registry's buckets, its rings of errors and blocked-hub reports, and the per-minute
history are read back from a shared memcached. Property tests write items whose shape is
ours but whose numbers (or types) are absurd straight into a real memcached (infinity,
NaN, 4,000-digit integers, negative sizes, the year 2286, strings, booleans, decimals,
huge lists), then read them through the admin API: every answer is a 200 with JSON that
holds no such value, the hostile record is listed nowhere (absent), and the next write of
its bucket replaces it.
"""

from __future__ import annotations

import decimal
import json
import math
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.admin.history import MINUTES, slot_key
from service.admin.registry import BUCKETS, ERRORS_KEY, HUB_KEY, bucket_key, bucket_of
from service.flask.state import state_of
from service.memcache.codec import header
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached
TOKEN = "hostile-admin-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

absurd = st.one_of(
    st.sampled_from([math.inf, -math.inf, math.nan, -1, -1.5, 10**4000, 2**64, 9.9e9 * 1e9,
                     True, False, "12", "", decimal.Decimal("1e400"), [1] * 10_000,
                     {"n": 1}, (1, 2), b"\x00"]),
    st.floats(allow_nan=True).filter(lambda f: not math.isfinite(f) or f < 0),
    st.integers(max_value=-1), st.integers(min_value=2**53 + 1),
    st.text(max_size=8), st.lists(st.integers(), max_size=5),
)
TIME_FIELDS = ("t", "sa")
NUMBER_FIELDS = ("t", "sa", "f", "z", "pid")


def good_record(key: str, now: float) -> dict[str, Any]:
    return {"k": key, "s": "items", "kind": "source", "p": {"id": "evil"}, "o": "ok",
            "e": None, "t": now, "h": "host", "pid": 7, "sa": now, "etag": "x",
            "z": 10, "f": 0.01, "w": [60.0, 600.0, 0.0]}


@pytest.fixture
def admin_app(memcached: Any, origin_server: Any, make_app: Any,
              monkeypatch: pytest.MonkeyPatch) -> Flask:
    monkeypatch.setenv("SERVICE_ADMIN_TOKEN", TOKEN)
    app: Flask = make_app(settings_for([memcached.address], sources={
        "items": {"kind": "http", "url": origin_server.url + "/items?id={id}", "max_age": 60,
                  "stale_while_revalidate": 600},
    }))
    return app


def admin_get(app: Flask, path: str) -> Any:
    answer = app.test_client().get(path, headers=BEARER)
    assert answer.status_code == 200, answer.get_data(as_text=True)[:500]
    text = answer.get_data(as_text=True)
    # Strict JSON: no NaN or Infinity, and every number a browser can hold.
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
    assert not any(abs(n) > 2**53 for n in _numbers(doc)), text[:300]
    return doc


def _numbers(doc: Any) -> list[float]:
    if isinstance(doc, bool) or doc is None or isinstance(doc, str):
        return []
    if isinstance(doc, int | float):
        return [doc]
    values = doc.values() if isinstance(doc, dict) else doc
    return [n for v in values for n in _numbers(v)]


def the_bucket_of_a_real_key(app: Flask) -> tuple[str, str]:
    """A key the registry lists (loaded through /v1), and the registry item of its bucket."""
    assert app.test_client().get("/v1/items?id=1").status_code == 200
    state = state_of(app)
    key = next(k for k, known in state.ledger.items() if known.source == "items")
    return key, bucket_key(bucket_of(key, BUCKETS))


@EXAMPLES
@given(field=st.sampled_from([*NUMBER_FIELDS, "w", "w0", "p", "kind", "k", "s", "o", "e"]),
       bad=absurd)
def test_a_registry_record_with_a_hostile_field_is_absent_and_replaced(
        admin_app: Flask, field: str, bad: Any) -> None:
    key, bucket = the_bucket_of_a_real_key(admin_app)
    store = state_of(admin_app).store.child("registry")
    now = state_of(admin_app).clock()
    evil = good_record("evil-key", now)
    if field == "w0":
        evil["w"] = [bad, 1.0, 1.0]
    elif field in ("p", "kind", "k", "s", "o", "e") and isinstance(bad, str):
        evil[field] = {"id": 1} if field == "p" else 5     # a number where text goes
    else:
        evil[field] = bad
    current = store.get(bucket)
    records = dict(current["r"]) if isinstance(current, dict) else {}
    records["evil-key" if field != "k" else "evil-key"] = evil
    try:
        store.set(bucket, {"v": 1, "r": records})
    except Exception:            # the codec cannot even write it (the 4,300-digit limit)
        pytest.skip("not encodable")
    listing = admin_get(admin_app, "/admin/api/entries?limit=1000")
    assert all(row["key"] != "evil-key" for row in listing["entries"])
    assert any(row["key"] == key for row in listing["entries"])     # its neighbours stay
    # The next write of the bucket (an invalidation of the real key) drops it.
    assert admin_app.test_client().delete("/admin/api/sources/items?id=1",
                                          headers=BEARER).status_code == 200
    assert "evil-key" not in store.get(bucket)["r"]


@pytest.mark.parametrize("digits", [5000, 400])
def test_a_registry_bucket_with_thousands_of_digits_is_no_500(
        admin_app: Flask, memcached: Any, digits: int) -> None:
    key, bucket = the_bucket_of_a_real_key(admin_app)
    mkey = state_of(admin_app).store.child("registry").key(bucket)
    raw = ('{"v":1,"r":{"evil":{"k":"evil","s":"items","o":"ok","t":%s}}}' % ("9" * digits))
    memcached.raw_set(mkey, header(b"j") + raw.encode())
    listing = admin_get(admin_app, "/admin/api/entries")
    assert all(row["key"] != "evil" for row in listing["entries"])


@EXAMPLES
@given(ring=st.sampled_from([ERRORS_KEY, HUB_KEY]),
       field=st.sampled_from(["t", "at", "seconds", "pid", "e", "h", "stack"]), bad=absurd)
def test_an_error_or_hub_report_with_a_hostile_field_is_absent(
        admin_app: Flask, ring: str, field: str, bad: Any) -> None:
    store = state_of(admin_app).store.child("registry")
    now = state_of(admin_app).clock()
    good = {"k": "good", "s": "items", "o": "error", "e": "boom", "t": now, "h": "host",
            "pid": 1, "at": now, "seconds": 0.5, "greenlet": "g", "stack": "s"}
    evil = dict(good, k="evil", greenlet="evil")
    evil[field] = bad if not (field in ("e", "h", "stack") and isinstance(bad, str)) else 5
    try:
        store.set(ring, {"items": [evil, good]})
    except Exception:
        pytest.skip("not encodable")
    stats = admin_get(admin_app, "/admin/api/stats")
    listed = stats["errors"] if ring == ERRORS_KEY else stats["hub"]
    assert all(item.get("k") != "evil" and item.get("greenlet") != "evil" for item in listed)
    assert any(item.get("k") == "good" for item in listed)


@EXAMPLES
@given(bad=absurd, garbage_minute=st.one_of(absurd, st.none()))
def test_a_history_minute_with_a_hostile_count_reads_as_zero(
        admin_app: Flask, bad: Any, garbage_minute: Any) -> None:
    store = state_of(admin_app).store.child("history")
    minute = int(state_of(admin_app).clock() // 60) - 1
    try:
        store.set(slot_key(minute), {"m": minute, "c": {"hit": bad, "miss": 3}})
        store.set(slot_key(minute - 1), {"m": garbage_minute, "c": {"hit": bad}})
    except Exception:
        pytest.skip("not encodable")
    history = admin_get(admin_app, "/admin/api/stats")["history"]
    assert len(history["series"]["hit"]) == MINUTES
    assert history["series"]["hit"][-2] == 0 and history["series"]["miss"][-2] == 3


@pytest.mark.parametrize("token", ["host:\u00b2:abc", "host:" + "9" * 5000 + ":abc",
                                   "host:-1:abc", "host:\u0663:abc", ":1:abc"])
def test_a_lease_naming_an_absurd_process_is_no_500(admin_app: Flask, token: str) -> None:
    key, _ = the_bucket_of_a_real_key(admin_app)
    state_of(admin_app).leases.leases.set(key, token, 60)
    listing = admin_get(admin_app, "/admin/api/entries")
    row = next(row for row in listing["entries"] if row["key"] == key)
    assert row["lease_holder"] == {"host": "?", "pid": None}
