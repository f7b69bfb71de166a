"""Small functions used as ``python`` source targets by the tests and the bench.

Configured as ``target = "tests.sources_fixtures:NAME"``. Query parameters always arrive as
text, so every numeric parameter here is parsed from a string.
"""

from __future__ import annotations

import os
import time
from typing import Any


def echo(**kwargs: str) -> dict[str, str]:
    """Every query parameter, returned as is (accepts any parameter)."""
    return dict(kwargs)


def double(x: str) -> int:
    """``2 * int(x)``; ``x`` is required, so a request without it is a 400."""
    return 2 * int(x)


def fails() -> None:
    """Always raises: the origin failed."""
    raise RuntimeError("fixture failure: the origin is broken")


FLAKY = {"failing": False}
"""The switch of :func:`flaky` (a test sets it with ``monkeypatch.setitem``)."""


def flaky(id: str) -> dict[str, str]:  # noqa: A002 - the query parameter's name
    """Answers while ``FLAKY["failing"]`` is false, raises while it is true."""
    if FLAKY["failing"]:
        raise RuntimeError("fixture failure: the origin is down for now")
    return {"id": id}


class Opaque:
    """An object no JSON encoder knows."""


def not_json(kind: str = "set") -> Any:
    """A value that is not JSON-encodable: a set, or an arbitrary object."""
    return {1, 2, 3} if kind == "set" else Opaque()


def slow(seconds: str = "0.5", tag: str = "") -> dict[str, float]:
    """Waits like I/O does (``time.sleep`` releases the GIL): right for executor="thread".

    ``tag`` only makes distinct cache entries."""
    duration = float(seconds)
    time.sleep(duration)
    return {"slept": duration}


def burn(seconds: str = "0.5", tag: str = "") -> dict[str, float | int]:
    """Burns CPU in a pure-Python loop (holding the GIL) for about ``seconds``.

    ``tag`` only makes distinct cache entries.
    """
    duration = float(seconds)
    deadline = time.perf_counter() + duration
    loops = 0
    while time.perf_counter() < deadline:
        for i in range(1000):
            loops += i & 1
    return {"burned": duration, "loops": loops}


def pid(tag: str = "") -> int:
    """The process this runs in (``tag`` only makes distinct cache entries)."""
    return os.getpid()


def niceness(tag: str = "") -> dict[str, int]:
    """The process this runs in and its niceness."""
    return {"pid": os.getpid(), "nice": os.nice(0)}


def big(size: str = "2000000") -> str:
    """A text value of ``size`` characters (larger than memcached's 1 MiB items)."""
    return "v" * int(size)


def crash(code: str = "3") -> None:
    """Ends its process at once, as a segfaulting extension would (process executor only)."""
    os._exit(int(code))


def typed(n: int, ratio: float = 1.0, flag: bool = False) -> dict[str, Any]:
    """Annotated parameters: the source converts the query's text before the call."""
    return {"n": n, "ratio": ratio, "flag": flag, "types": [type(v).__name__
                                                           for v in (n, ratio, flag)]}
