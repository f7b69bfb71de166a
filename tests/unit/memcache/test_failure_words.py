"""What a memcached failure line says of its cause: never nothing (an outage line once read
"is unreachable ()": a closed socket's exception has no message)."""

from __future__ import annotations

import pytest
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from service.memcache.connection import _error_kind, _reason


@pytest.mark.parametrize(("exc", "said"), [
    (MemcacheUnexpectedCloseError(), "connection (MemcacheUnexpectedCloseError)"),
    (TimeoutError(), "timeout (TimeoutError)"),
    (TimeoutError("timed out"), "timeout: timed out"),
    (ConnectionRefusedError(111, "Connection refused"), "connection: [Errno 111] Connection "
                                                        "refused"),
])
def test_the_reason_names_the_kind_and_the_cause(exc: BaseException, said: str) -> None:
    assert _reason(exc, _error_kind(exc)) == said
