"""Decorator parameters are checked where they are declared, naming the parameter."""

from __future__ import annotations

import math

import pytest

from service.config import ConfigError
from service.flask.decorators import Options


@pytest.mark.parametrize("name", ["max_age", "stale_while_revalidate", "stale_if_error"])
@pytest.mark.parametrize("value", [-5, -0.1, math.inf, math.nan, "60", True])
def test_a_window_that_is_no_number_of_seconds_is_refused(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{name}="):
        Options(**{name: value})  # type: ignore[arg-type]


def test_windows_of_zero_and_more_and_none_are_taken() -> None:
    Options(max_age=0, stale_while_revalidate=0.5, stale_if_error=None)
    Options(max_age=None)


def test_swr_cached_refuses_a_negative_max_age_at_decoration() -> None:
    from service import SWR

    with pytest.raises(ConfigError, match="max_age=-5"):
        SWR().cached(max_age=-5)
