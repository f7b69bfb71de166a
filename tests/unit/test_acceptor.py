"""``service.acceptor``: a gevent worker accepts every waiting connection each turn of its
loop (gunicorn's one per turn is ignored); other workers and servers are left alone."""

from __future__ import annotations

from typing import Any


def test_a_gevent_worker_accepts_waiting_connections_in_batches(monkeypatch: Any) -> None:
    from gevent.server import StreamServer
    from gunicorn.workers import ggevent

    from service.acceptor import ACCEPT_PER_TURN, BatchAcceptServer, accept_in_batches

    monkeypatch.setattr(ggevent, "StreamServer", StreamServer)   # put back afterwards
    worker = object.__new__(ggevent.GeventWorker)                 # a worker before run()
    accept_in_batches(worker)
    accept_in_batches(worker)                                     # twice: still in place
    assert ggevent.StreamServer is BatchAcceptServer
    server = ggevent.StreamServer(("127.0.0.1", 0), handle=lambda *a: None)
    try:
        server.max_accept = 1                  # what gunicorn sets when workers > 1
        assert server.max_accept == ACCEPT_PER_TURN > 1
    finally:
        server.close()


def test_other_workers_and_other_servers_are_left_as_they_are(monkeypatch: Any) -> None:
    from gevent.server import StreamServer
    from gunicorn.workers import ggevent
    from gunicorn.workers.sync import SyncWorker

    from service.acceptor import accept_in_batches

    monkeypatch.setattr(ggevent, "StreamServer", StreamServer)
    accept_in_batches(object.__new__(SyncWorker))                     # no gevent loop
    accept_in_batches(object.__new__(ggevent.GeventPyWSGIWorker))     # its own server
    assert ggevent.StreamServer is StreamServer

    class Elsewhere(StreamServer):  # type: ignore[misc]
        """A server class someone else put there: not ours to replace."""

    monkeypatch.setattr(ggevent, "StreamServer", Elsewhere)
    accept_in_batches(object.__new__(ggevent.GeventWorker))
    assert ggevent.StreamServer is Elsewhere
