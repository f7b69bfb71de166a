"""The circuit breaker's decisions, with a fake clock."""

from service.memcache.breaker import CircuitBreaker


def test_opens_after_consecutive_failures_only() -> None:
    b = CircuitBreaker(failures=3, reset=5.0)
    b.record_failure(0.0)
    b.record_failure(0.0)
    b.record_success()
    b.record_failure(1.0)
    b.record_failure(1.0)
    assert b.allow(1.0) and b.state(1.0) == "closed"
    b.record_failure(1.0)
    assert b.state(1.0) == "open"
    assert not b.allow(5.9)


def test_half_open_lets_one_probe_through_and_its_result_decides() -> None:
    b = CircuitBreaker(failures=1, reset=5.0)
    b.record_failure(0.0)
    assert b.state(5.0) == "half-open"
    assert b.allow(5.0)          # the probe
    assert not b.allow(5.1)      # everybody else waits for it
    b.record_failure(5.2)
    assert not b.allow(10.1)     # open again for a full cool-down
    assert b.allow(10.2)
    b.record_success()
    assert b.state(10.3) == "closed" and b.allow(10.3)


def test_a_probe_that_never_reports_is_replaced_after_a_cool_down() -> None:
    b = CircuitBreaker(failures=1, reset=5.0)
    b.record_failure(0.0)
    assert b.allow(5.0)
    assert not b.allow(9.9)
    assert b.allow(10.0)
