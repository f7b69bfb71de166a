"""The claims' pure parts: when to renew, what a record says, what a meta reply says."""

import pytest
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnknownCommandError,
)

from service.errors import OriginError, OriginTimeout
from service.memcache.meta import Reply, parse_status
from service.readpath.lease import (
    PASS_RECORD,
    error_of,
    error_record,
    holder_of,
    is_pass,
    new_token,
    renew_every,
)


def test_renewal_leaves_room_for_two_failed_renewals() -> None:
    assert renew_every(30.0) == 10.0
    assert renew_every(0.01) == 0.05      # never a busy loop


def test_a_public_key_can_never_name_a_key_of_a_family() -> None:
    from service.config import CacheSettings
    from service.memcache.clients import ClientPool
    from service.memcache.store import Store

    store = Store(ClientPool(CacheSettings()), "svc.swr", 1024 * 1024)  # connects nothing
    lease = store.child("lease", follow=True)
    assert lease.key("k").startswith(b"svc.swr.lease:")
    for public in ("k", "lease\x00k", "lease:k", ".lease:k:k", "svc.swr.lease:k:k"):
        assert store.key(public) != lease.key("k")
    assert lease.key("a") != lease.key("b")


def test_an_error_record_says_the_failure_and_carries_no_time_of_its_own() -> None:
    record = error_record(OriginTimeout("slow"))
    assert set(record) == {"\x00failed", "status", "detail"}   # no clock: the server's TTL
    again = error_of(record)
    assert isinstance(again, OriginTimeout) and again.status == 504
    assert isinstance(error_of(error_record(OriginError("down"))), OriginError)
    for foreign in (None, 7, "x", {"status": 502}, {"\x00failed": 1, "status": 500,
                    "detail": "x"}, {"\x00failed": 1, "status": 502, "detail": 5},
                    PASS_RECORD):
        assert error_of(foreign) is None


def test_a_pass_record_is_only_itself() -> None:
    assert is_pass(PASS_RECORD)
    for other in ({"\x00pass": 1, "x": 2}, {"\x00pass": True, "y": 1}, None, "pass", {}):
        assert not is_pass(other)


def test_a_lease_token_names_its_holder_and_stays_unique() -> None:
    first, second = new_token("web-1", 4242), new_token("web-1", 4242)
    assert first != second
    assert holder_of(first) == {"host": "web-1", "pid": 4242}
    assert holder_of(new_token("a:b", 7)) == {"host": "a_b", "pid": 7}
    for foreign in (None, 17, "", "0123abcd", "host:notapid:x", "host:12:"):
        assert holder_of(foreign) is None


def test_meta_status_lines_parse_into_code_size_and_flags() -> None:
    assert parse_status(b"VA 0 c1 t-1 f0 s0 W") == (b"VA", 0, {"c": "1", "t": "-1", "f": "0",
                                                               "s": "0", "W": ""})
    assert parse_status(b"HD c17") == (b"HD", None, {"c": "17"})
    assert parse_status(b"EN") == (b"EN", None, {})
    reply = Reply(b"VA", {"c": "9", "t": "30", "Z": ""}, b"")
    assert reply.contended and not reply.won and reply.cas == b"9" and reply.ttl == 30
    assert Reply(b"EX", {"c": "0"}).cas is None       # "c0" on a failed write: no token
    with pytest.raises(MemcacheUnknownCommandError):
        parse_status(b"ERROR")
    with pytest.raises(MemcacheClientError):
        parse_status(b"CLIENT_ERROR bad command line format")
    with pytest.raises(MemcacheServerError):
        parse_status(b"VALUE k 0 3")                  # a classic reply is no meta reply
    with pytest.raises(MemcacheServerError):
        parse_status(b"VA x")
