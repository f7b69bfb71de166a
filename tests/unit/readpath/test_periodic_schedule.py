"""When a periodic job runs next: its period counted from the start of the last run."""

from service.readpath.refresher import next_run_in


def test_the_period_counts_from_the_start_of_the_run() -> None:
    # every=5, the run took 1 s: the next starts 4 s after this one ended, 5 s after it began.
    assert next_run_in(5.0, started=100.0, now=101.0, rand=0.0) == 4.0


def test_jitter_only_brings_the_next_run_earlier_and_by_at_most_five_percent() -> None:
    assert 3.75 <= next_run_in(5.0, 100.0, 101.0, rand=1.0) < 4.0


def test_a_run_longer_than_its_period_is_followed_at_once_but_never_in_a_busy_loop() -> None:
    assert next_run_in(5.0, started=100.0, now=107.0, rand=0.5) == 0.05
