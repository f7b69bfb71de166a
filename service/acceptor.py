"""How a gevent worker takes new connections from the listening socket it shares with the
other workers: every waiting one (up to :data:`ACCEPT_PER_TURN`) per turn of its loop.

gunicorn's gevent worker runs a gevent ``StreamServer`` on the listening socket, which all
workers share; the kernel wakes every worker when connections wait, and whichever calls
``accept`` first gets them. With more than one worker, gunicorn makes that server accept
one connection per turn of the loop, so that one worker does not take them all. But a
turn serves every connection that has a request ready (``service.worker.post_request``),
and takes longer the more connections the worker has: with 500 busy connections a turn is
100-150 ms, and a burst of new connections waits in the listen queue one turn per
connection before it. At 1,000 connections on 2 workers (wrk, ``python -m
bench.throughput``) that was the whole tail: p99 1.5-2.8 s and 60-150 requests over 5 s,
for a raw WSGI app as much as for a cache hit; with batches, p99 0.3-1.0 s and none.

Batches leave the split between workers to the race: the worker whose loop comes round
first takes what is waiting. A less busy worker comes round sooner, so under load the
split evens out; but a burst of keep-alive connections can land 2:1 (measured: 765 of
1,000), and one worker of an idle server can win every connection opened one after
another. A delay before accepting that grows with the worker's own connections was tried
to let the less busy worker win: libev's timers are rounded up to whole milliseconds, so
it either could not tell 40 connections from 60, or, scaled to, added milliseconds to
every new connection of a busy server. ``reuse_port`` splits evenly by count, but resets
the connections waiting at a worker that exits (see ``deploy/gunicorn.conf.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from gevent.server import StreamServer

log = logging.getLogger(__name__)

#: New connections a gevent worker accepts each time its listening socket is ready:
#: gevent's own default.
ACCEPT_PER_TURN = 100


class BatchAcceptServer(StreamServer):  # type: ignore[misc]
    """gevent's ``StreamServer``, accepting up to :data:`ACCEPT_PER_TURN` connections each
    time the listening socket is ready; the 1 gunicorn sets is ignored."""

    @property
    def max_accept(self) -> int:
        return ACCEPT_PER_TURN

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        pass  # gunicorn's 1 for several workers: see the module's docstring


def accept_in_batches(worker: Any) -> None:
    """Make this gevent worker's server a :class:`BatchAcceptServer`.

    Called by ``service.worker.post_worker_init``, in the worker, before gunicorn builds its
    server: the class gunicorn's gevent worker module instantiates is swapped, in this
    process only. The pywsgi worker (``gevent_pywsgi``) builds another server, which
    accepts gevent's default batch already; other worker classes have no gevent server.
    """
    from gunicorn.workers import ggevent

    if not isinstance(worker, ggevent.GeventWorker) or worker.server_class is not None:
        return
    found = getattr(ggevent, "StreamServer", None)
    if found is BatchAcceptServer:
        return
    if found is not StreamServer:
        log.warning("gunicorn's gevent worker does not build gevent's StreamServer here: "
                    "new connections are accepted as gunicorn decides")
        return
    ggevent.StreamServer = BatchAcceptServer
