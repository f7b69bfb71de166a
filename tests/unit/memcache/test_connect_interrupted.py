"""A connect cut short by a greenlet's kill closes the socket it was opening.

pymemcache closes a half-open socket on an ``Exception`` only; a refresher greenlet killed
at shutdown while it connects raised ``GreenletExit`` through it and left the socket to the
garbage collector (an unclosed-socket warning, at random, in a later test).
"""

from __future__ import annotations

import socket

import gevent
import gevent.socket

from service.config import CacheSettings
from service.memcache.clients import ClientPool


def test_a_killed_connect_closes_the_socket_it_was_opening() -> None:
    # A listener whose backlog is full drops further SYNs: the next connect hangs, for real.
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        pool = ClientPool(CacheSettings(servers=(f"127.0.0.1:{port}",), connect_timeout=30.0))
        client = pool.new_client(f"127.0.0.1:{port}")
        connecting = gevent.spawn(client._connect)
        with gevent.Timeout(5):
            while client.socket_module.opening is None:
                gevent.sleep(0.01)
        opening = client.socket_module.opening
        gevent.sleep(0.05)
        assert not connecting.dead, "the connect should hang on the full backlog"
        connecting.kill(block=True, timeout=5)
        assert connecting.dead and client.sock is None
        assert opening.fileno() == -1, "the half-open socket was left open"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
