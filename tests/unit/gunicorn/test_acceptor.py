"""``service.gunicorn.acceptor``: a gevent worker accepts every waiting connection each turn of its
loop (gunicorn's one per turn is ignored), and a worker busier than another live one
leaves the waiting connections to it for a moment; other workers and servers are left
alone."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket
from gevent.event import Event
from gevent.server import StreamServer
from gunicorn.workers import ggevent

from service.gunicorn.acceptor import (
    ACCEPT_PER_TURN,
    SLOTS,
    BatchAcceptServer,
    Board,
    accept_in_batches,
    leave_to_peer,
    release,
)


@pytest.fixture
def no_board(monkeypatch: Any) -> None:
    """The installer's class-wide board and gunicorn's server class, put back afterwards."""
    monkeypatch.setattr(BatchAcceptServer, "board", None)
    monkeypatch.setattr(ggevent, "StreamServer", StreamServer)


def gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- the decision -----------------------------------------------------------------------


def test_a_worker_leaves_connections_only_to_a_clearly_less_busy_peer() -> None:
    assert not leave_to_peer(5, [])                 # alone: always take them
    assert not leave_to_peer(0, [0])
    assert not leave_to_peer(2, [0])                # a couple more: not worth a wait
    assert leave_to_peer(3, [0])
    assert not leave_to_peer(500, [450])            # within an eighth of the peer
    assert leave_to_peer(500, [400])
    assert leave_to_peer(60, [70, 40])              # the least busy peer counts
    assert not leave_to_peer(40, [70, 40])


# -- the board -------------------------------------------------------------------------


def test_workers_see_each_others_connections_and_the_last_one_out_removes_the_board(
    tmp_path: Path
) -> None:
    path = tmp_path / "board"
    mine, peer = Board(path, pid=os.getpid()), Board(path, pid=os.getppid())
    mine.publish(1)                                 # not on the board yet: nowhere to write
    assert peer.peers() == []
    mine.join()
    peer.join()
    assert mine.slot != peer.slot
    mine.publish(7)
    peer.publish(3)
    assert mine.peers() == [(os.getppid(), 3)]
    assert peer.peers() == [(os.getpid(), 7)]
    mine.release()
    assert peer.peers() == [] and path.exists()
    peer.release()
    assert not path.exists()


def test_a_slot_left_by_a_killed_worker_is_claimed_again(tmp_path: Path) -> None:
    path = tmp_path / "board"
    killed = Board(path, pid=gone_pid())            # never released
    killed.join()
    fresh = Board(path, pid=os.getpid())
    fresh.join()
    assert fresh.slot == killed.slot
    assert fresh.peers() == []
    fresh.release()


def test_boards_of_masters_that_are_gone_are_swept(tmp_path: Path) -> None:
    from service.gunicorn.acceptor import board_path, sweep

    gone, live = tmp_path / f"swr-accept-{gone_pid()}", tmp_path / f"swr-accept-{os.getpid()}"
    other = tmp_path / "swr-accept-notes"
    for path in (gone, live, other):
        path.write_bytes(b"")
    sweep(tmp_path)
    assert not gone.exists() and live.exists() and other.exists()
    assert board_path(123).name == "swr-accept-123"


def test_a_full_board_leaves_the_worker_accepting_as_if_alone(tmp_path: Path) -> None:
    path = tmp_path / "board"
    first = Board(path, pid=os.getpid())
    first.join()
    with open(path, "r+b") as f:                    # every other slot: pid 1, alive
        for slot in range(SLOTS):
            if slot != first.slot:
                f.seek(slot * 8)
                f.write(struct.pack("=iI", 1, 0))
    late = Board(path, pid=os.getppid())
    late.join()
    assert late.slot is None
    late.publish(5)                                 # nowhere to write: no error
    assert len(late.peers()) == SLOTS
    first.release()


# -- the server --------------------------------------------------------------------------


def test_a_gevent_worker_accepts_waiting_connections_in_batches(no_board: None) -> None:
    worker = object.__new__(ggevent.GeventWorker)                 # a worker before run()
    worker.ppid = gone_pid()                                      # a board of its own
    accept_in_batches(worker)
    accept_in_batches(worker)                                     # twice: still in place
    assert ggevent.StreamServer is BatchAcceptServer
    assert BatchAcceptServer.board is not None
    server = ggevent.StreamServer(("127.0.0.1", 0), handle=lambda *a: None)
    try:
        server.max_accept = 1                  # what gunicorn sets when workers > 1
        assert server.max_accept == ACCEPT_PER_TURN > 1
    finally:
        server.close()                         # frees the slot, removes the board
        release(worker)
    assert not BatchAcceptServer.board.path.exists()


def test_other_workers_and_other_servers_are_left_as_they_are(no_board: None,
                                                               monkeypatch: Any) -> None:
    from gunicorn.workers.sync import SyncWorker

    accept_in_batches(object.__new__(SyncWorker))                     # no gevent loop
    accept_in_batches(object.__new__(ggevent.GeventPyWSGIWorker))     # its own server
    assert ggevent.StreamServer is StreamServer

    class Elsewhere(StreamServer):  # type: ignore[misc]
        """A server class someone else put there: not ours to replace."""

    monkeypatch.setattr(ggevent, "StreamServer", Elsewhere)
    accept_in_batches(object.__new__(ggevent.GeventWorker))
    assert ggevent.StreamServer is Elsewhere


class Counting(BatchAcceptServer):
    """Counts the waits it leaves to a peer."""

    waits = 0

    def _after_peer_wait(self) -> None:
        type(self).waits += 1
        super()._after_peer_wait()


def serve_busy(tmp_path: Path, peer_connections: int, peer_pid: int) -> tuple[int, int]:
    """A server with 5 open connections and a peer on its board with
    ``peer_connections``: open one more connection; (waits, connections answered)."""
    path = tmp_path / "board"
    Counting.board = Board(path, pid=os.getpid())
    peer = Board(path, pid=peer_pid)
    peer.join()
    peer.publish(peer_connections)
    Counting.waits = 0
    answered = Event()
    held: list[Any] = []

    def handle(sock: Any, address: Any) -> None:
        held.append(sock)
        if len(held) == 6:
            answered.set()
        gevent.sleep(30)                      # keep the connection (and its pool slot)

    server = Counting(("127.0.0.1", 0), handle=handle, spawn=100)
    server.start()
    clients = []
    try:
        for _ in range(6):
            clients.append(socket.create_connection(server.address, timeout=5))
        assert answered.wait(timeout=5), "every connection accepted"
        return Counting.waits, len(held)
    finally:
        for c in clients:
            c.close()
        server.stop(timeout=1)
        peer.release()
        Counting.board = None


def test_a_busier_worker_leaves_connections_to_a_live_idle_peer_then_takes_them(
    tmp_path: Path
) -> None:
    # The peer is alive (our parent) but never accepts: the wait ends and this one takes
    # the connection anyway.
    waits, held = serve_busy(tmp_path, peer_connections=0, peer_pid=os.getppid())
    assert held == 6 and waits >= 1


def test_no_wait_for_a_busier_peer_or_a_dead_one(tmp_path: Path) -> None:
    assert serve_busy(tmp_path, peer_connections=50, peer_pid=os.getppid()) == (0, 6)
    assert serve_busy(tmp_path, peer_connections=0, peer_pid=gone_pid()) == (0, 6)


def test_the_board_counts_connections_closed_all_at_once(tmp_path: Path) -> None:
    path = tmp_path / "board"
    BatchAcceptServer.board = Board(path, pid=os.getpid())
    peer = Board(path, pid=os.getppid())
    peer.join()

    def handle(sock: Any, address: Any) -> None:
        while sock.recv(100):
            pass

    server = BatchAcceptServer(("127.0.0.1", 0), handle=handle, spawn=100)
    server.start()
    clients = [socket.create_connection(server.address, timeout=5) for _ in range(5)]
    try:
        for _ in range(100):            # until the server has taken all five
            if peer.peers() == [(os.getpid(), 5)]:
                break
            gevent.sleep(0.01)
        assert peer.peers() == [(os.getpid(), 5)]
        for client in clients:
            client.close()
        # All five end in the same turn of the loop, before their greenlets leave the
        # pool: counting the pool would leave 4 on the board, and the other workers would
        # then leave the next burst to this one.
        for _ in range(100):
            if peer.peers() == [(os.getpid(), 0)]:
                break
            gevent.sleep(0.01)
        assert peer.peers() == [(os.getpid(), 0)]
    finally:
        server.stop(timeout=1)
        peer.release()
        BatchAcceptServer.board = None
