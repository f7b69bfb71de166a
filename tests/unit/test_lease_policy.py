"""The lease's pure decisions: when to renew, how to poll, when a waiter takes over."""

import math

from service.lease import lease_key, may_take_over, poll_delays, renew_every


def test_renewal_leaves_room_for_two_failed_renewals() -> None:
    assert renew_every(30.0) == 10.0
    assert renew_every(0.01) == 0.05      # never a busy loop


def test_poll_delays_grow_jittered_and_cap() -> None:
    fixed = poll_delays(first=0.01, factor=2.0, cap=0.08, rand=lambda: 0.5)
    assert [round(fixed(), 4) for _ in range(6)] == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
    low = poll_delays(first=0.1, rand=lambda: 0.0)
    high = poll_delays(first=0.1, rand=lambda: 1.0)
    assert low() == 0.05
    assert math.isclose(high(), 0.15)        # +/-50% jitter around the step


def test_a_waiter_takes_over_only_when_the_lease_lapsed_and_nothing_landed() -> None:
    assert may_take_over(lease_present=False, entry_landed=False)
    assert not may_take_over(lease_present=True, entry_landed=False)
    assert not may_take_over(lease_present=False, entry_landed=True)
    assert not may_take_over(lease_present=True, entry_landed=True)


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
