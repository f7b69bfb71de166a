"""``service.worker.post_request``: the per-request yield of a gevent worker."""

from __future__ import annotations

import gevent

from service.worker import post_request


def test_post_request_lets_a_ready_greenlet_run_before_it_returns() -> None:
    ran: list[str] = []
    other = gevent.spawn(ran.append, "other")
    try:
        post_request(None, None, {}, None)
        # The other greenlet was ready; the hook gave it its turn before the connection's
        # greenlet went on to read its next request.
        assert ran == ["other"]
    finally:
        other.kill()
