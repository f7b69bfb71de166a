"""The lease's pure decisions: when to renew, what a lease value says, how long it lives."""

from service.lease import SKEW, alive, lease_key, lease_value, owner_of, renew_every


def test_renewal_leaves_room_for_two_failed_renewals() -> None:
    assert renew_every(30.0) == 10.0
    assert renew_every(0.01) == 0.05      # never a busy loop


def test_a_lease_value_names_its_owner_and_lives_until_its_own_deadline() -> None:
    value = lease_value("host:1:abc", 100.2)
    assert value == "host:1:abc@101" and owner_of(value) == "host:1:abc"
    assert alive(value, 101.0) and alive(value, 101.0 + SKEW)
    assert not alive(value, 101.0 + SKEW + 0.1)       # past its own deadline: dead
    for garbage in ("host:1:abc", "@5", "x@y", 7, None, b"t@1"):
        assert owner_of(garbage) is None and not alive(garbage, 0.0)


def test_lease_keys_are_distinct_from_entry_keys() -> None:
    assert lease_key("report") != "report"
    assert lease_key("a") != lease_key("b")


def test_a_lease_item_outlives_memcached_s_whole_second_rounding() -> None:
    from service.lease import item_lifetime

    # exptime N lives N-1..N seconds: send one more than the lease so it lives >= lease.
    assert item_lifetime(1.0) == 2.0
    assert item_lifetime(0.5) == 2.0
    assert item_lifetime(30.0) == 31.0
    for lease in (0.2, 1.0, 2.5, 30.0):
        assert item_lifetime(lease) - 1 >= lease


def test_a_lease_token_names_its_holder_and_stays_unique() -> None:
    from service.lease import holder_of, new_token

    first, second = new_token("web-1", 4242), new_token("web-1", 4242)
    assert first != second
    assert holder_of(first) == {"host": "web-1", "pid": 4242}
    assert holder_of(new_token("a:b", 7)) == {"host": "a_b", "pid": 7}
    for foreign in (None, 17, "", "0123abcd", "host:notapid:x", "host:12:"):
        assert holder_of(foreign) is None
