"""How a gevent worker takes new connections from the listening socket it shares with the
other workers: every waiting one per turn of its loop, and the least busy worker first.

gunicorn's gevent worker runs a gevent ``StreamServer`` on the listening socket, which all
workers share; the kernel wakes every worker when connections wait, and whichever calls
``accept`` first gets them. Two things went wrong under load, both measured with wrk at
1,000 connections on 2 workers (``python -m bench.throughput``, ``bench/findings.md``):

* With more than one worker, gunicorn makes that server accept one connection per turn of
  the loop, so that one worker does not take them all. But a turn serves every connection
  that has a request ready (``service.worker.post_request``), and takes longer the more
  connections the worker has: with 500 busy connections a turn is 100-150 ms, and a burst
  of new connections waits in the listen queue one turn per connection before it. That
  was the whole seconds-long tail (p99 1.5-2.8 s and 60-150 requests over 5 s, for a raw
  WSGI app as much as for a cache hit). A worker now accepts every connection waiting, up
  to :data:`ACCEPT_PER_TURN`, each time.
* Which worker wins the race has nothing to do with how busy it is: one worker of an idle
  server won nearly all of 60 connections opened one after another, and a burst of 1,000
  landed 765 to 302. Keep-alive connections stay where they land, and the busier worker's
  turns, so its answers, take twice as long (p99 1.85 s against 0.5 s for an even split).
  With batches alone, wrk's 32 connections often all went to one worker: half the
  throughput in 16 of 25 runs of 2 s, against none of 25 with the board below.

So the workers keep a small board in shared memory (:class:`Board`: each worker's pid and
open connections, one slot per worker, in a file under ``/dev/shm`` named after the
gunicorn master, removed by the last worker out). Before each accept a worker writes its
count and reads the others'; with clearly more than another live worker
(:func:`leave_to_peer`) it stays out for :data:`PEER_WAIT`, and the less busy one, woken by
the same connections, takes them meanwhile. After the wait it takes up to
:data:`PASSES_AFTER_WAIT` of what is still waiting before it looks again, so a peer that
is blocked or gone costs a new connection at most that wait, and only in a worker
already busier than the others. A worker joins the board once its server accepts, and
leaves it when its server closes (shutdown, reload); a worker killed outright is found
gone (its pid) and its slot freed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gevent.server import StreamServer

log = logging.getLogger(__name__)

#: New connections a gevent worker accepts each time its listening socket is ready:
#: gevent's own default.
ACCEPT_PER_TURN = 100
#: How long a busier worker leaves waiting connections to a less busy one: a few times
#: what an idle worker can take to wake on a shared machine, short beside a turn of a
#: busy worker (libev rounds timers up to whole milliseconds anyway). Every measurement
#: in bench/findings.md ran with 3 ms.
PEER_WAIT = 0.003
#: Connections a worker takes after a wait before it looks at the board again.
PASSES_AFTER_WAIT = 8
#: Workers one board holds; a worker finding no free slot accepts as if alone.
SLOTS = 64
_SLOT = struct.Struct("=iI")   # pid, open connections


def leave_to_peer(mine: int, peers: Sequence[int]) -> bool:
    """Whether a worker with ``mine`` open connections should leave the waiting ones to
    the least busy of ``peers`` (the others' counts): only when it has clearly more, by
    2 plus an eighth of the peer's count, so that two even workers do not take turns
    waiting for each other."""
    if not peers:
        return False
    least = min(peers)
    return mine > least + 2 + least // 8


def board_path(master_pid: int) -> Path:
    """The board shared by the workers of the gunicorn master ``master_pid``."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"{_PREFIX}{master_pid}"


_PREFIX = "swr-accept-"


def sweep(directory: Path) -> None:
    """Remove the boards of masters that are gone (their last worker was killed before it
    could remove the board): called as each worker starts, so they never pile up."""
    with contextlib.suppress(OSError):
        for path in directory.glob(_PREFIX + "*"):
            pid = path.name[len(_PREFIX):]
            if pid.isdigit() and not alive(int(pid)):
                with contextlib.suppress(OSError):
                    path.unlink()


class Board:
    """Open connections per worker, in a file every worker of one master maps.

    Each worker claims a free slot (or one whose pid is gone) under an exclusive lock of
    the file once its server accepts, writes its count at every accept and close, and
    frees its slot when it stops accepting. Reads and writes of a slot are one 8-byte
    copy each; a count read while its worker writes it is one connection behind, which is
    all the precision needed.
    """

    def __init__(self, path: Path, pid: int | None = None) -> None:
        import mmap

        self.path = path
        self.pid = os.getpid() if pid is None else pid
        self.slot: int | None = None
        with self._locked() as fd:
            if os.fstat(fd).st_size < SLOTS * _SLOT.size:
                os.ftruncate(fd, SLOTS * _SLOT.size)
            self.map = mmap.mmap(fd, SLOTS * _SLOT.size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield fd
            finally:
                # Unlocked explicitly: the mmap keeps a duplicate of the first fd, and a
                # lock belongs to the open file, which closing one fd does not end.
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def join(self) -> None:
        """Take a slot (free, or left by a worker that is gone), with 0 connections: from
        now on the others may leave connections to this worker. Only once it accepts."""
        with self._locked():
            self.slot = self._claim()
        if self.slot is None:
            log.warning("accept board %s is full (%d workers): this worker accepts as if "
                        "alone", self.path, SLOTS)

    def _claim(self) -> int | None:
        free = None
        for slot in range(SLOTS):
            pid, _ = _SLOT.unpack_from(self.map, slot * _SLOT.size)
            if pid == self.pid:
                return slot
            if free is None and (pid == 0 or not alive(pid)):
                free = slot
        if free is not None:
            _SLOT.pack_into(self.map, free * _SLOT.size, self.pid, 0)
        return free

    def publish(self, connections: int) -> None:
        """Write this worker's open connections."""
        if self.slot is not None:
            _SLOT.pack_into(self.map, self.slot * _SLOT.size, self.pid, connections)

    def peers(self) -> list[tuple[int, int]]:
        """(pid, open connections) of every other worker with a slot."""
        found = []
        for slot in range(SLOTS):
            if slot != self.slot:
                pid, connections = _SLOT.unpack_from(self.map, slot * _SLOT.size)
                if pid:
                    found.append((pid, connections))
        return found

    def forget(self, pid: int) -> None:
        """Free the slot of ``pid``, a worker found gone (killed without freeing it)."""
        for slot in range(SLOTS):
            if _SLOT.unpack_from(self.map, slot * _SLOT.size)[0] == pid:
                _SLOT.pack_into(self.map, slot * _SLOT.size, 0, 0)

    def release(self) -> None:
        """Free this worker's slot; the last worker out removes the file."""
        if self.slot is not None:
            _SLOT.pack_into(self.map, self.slot * _SLOT.size, 0, 0)
            self.slot = None
        with contextlib.suppress(OSError), self._locked():
            if not self.peers():
                self.path.unlink()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BatchAcceptServer(StreamServer):  # type: ignore[misc]
    """gevent's ``StreamServer``, accepting up to :data:`ACCEPT_PER_TURN` connections each
    time the listening socket is ready (the 1 gunicorn sets is ignored), and leaving them
    for :data:`PEER_WAIT` to a less busy worker on the :attr:`board`.

    It works through ``BaseServer``'s accept machinery: ``do_read`` (once per connection
    of a batch), ``do_close`` (once per connection done), ``start_accepting`` and
    ``stop_accepting`` and the ``_timer`` they manage; ``tests/unit/test_acceptor.py``
    runs it on the installed gevent.
    """

    #: Set by :func:`accept_in_batches` in the worker (this class is per process).
    board: Board | None = None

    @property
    def max_accept(self) -> int:
        return ACCEPT_PER_TURN

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        pass  # gunicorn's 1 for several workers: see the module's docstring

    #: Connections accepted and not yet done: counted here, not read off the pool, whose
    #: greenlets leave it a little after their connections close.
    _open = 0
    #: Connections still to accept without looking at the board (after a wait).
    _passes = 0

    def do_read(self) -> Any:
        """Accept one connection (``_do_read`` calls this up to :data:`ACCEPT_PER_TURN`
        times in a row), unless a less busy worker should have it: then stop, and look
        again after :data:`PEER_WAIT`. ``None`` ends the batch."""
        board = self.board
        if board is None:
            return super().do_read()
        mine = self._open
        if self._passes > 0:
            self._passes -= 1
        else:
            board.publish(mine)
            if self._busier_than_a_peer(board, mine):
                self._wait_for_peer()
                return None
        accepted = super().do_read()
        if accepted is None:
            self._passes = 0     # nothing waits: the next connection is looked at afresh
        else:
            self._open += 1
            board.publish(self._open)
        return accepted

    def _busier_than_a_peer(self, board: Board, mine: int) -> bool:
        peers = board.peers()
        if not leave_to_peer(mine, [n for _, n in peers]):
            return False
        pid, _ = min(peers, key=lambda peer: peer[1])
        if alive(pid):
            return True
        board.forget(pid)   # killed without freeing its slot: do not wait for it again
        return self._busier_than_a_peer(board, mine)

    def _wait_for_peer(self) -> None:
        # Stop watching the socket while we wait (it stays readable: watching it would
        # spin the loop); the less busy worker, woken by the same connections, takes them.
        self.stop_accepting()
        self._timer = self.loop.timer(PEER_WAIT)
        self._timer.start(self._after_peer_wait)

    def _after_peer_wait(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()
        # Whatever is still waiting, nobody else took: the next PASSES_AFTER_WAIT are
        # accepted without looking at the board again (a peer that is blocked or gone
        # must not cost a wait per connection), then it is looked at again.
        self._passes = PASSES_AFTER_WAIT
        self.start_accepting()

    def do_close(self, *args: Any) -> None:
        """A connection is done (its handler returned): the others see one fewer now, not
        at this worker's next accept, or they would keep counting connections a finished
        load left behind and leave the next burst to this worker."""
        super().do_close(*args)
        if self.board is not None:
            self._open = max(0, self._open - 1)
            self.board.publish(self._open)

    def start(self) -> None:
        super().start()
        if self.board is not None:
            # On the board only now that it accepts: a worker still starting must not be
            # left connections it cannot take yet.
            self.board.join()

    def close(self) -> None:
        # From now on this worker accepts nothing: the others must not wait for it.
        if self.board is not None:
            self.board.release()
        super().close()


def accept_in_batches(worker: Any) -> None:
    """Make this gevent worker's server a :class:`BatchAcceptServer` with a board shared
    with the other workers of its master.

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
    master = int(getattr(worker, "ppid", 0) or os.getppid())
    path = board_path(master)
    sweep(path.parent)
    try:
        BatchAcceptServer.board = Board(path)
    except OSError as exc:
        log.warning("no accept board (%s): this worker accepts without looking at the "
                    "others", exc)
    ggevent.StreamServer = BatchAcceptServer


def release(worker: Any) -> None:
    """Free this worker's slot on the board (``worker_exit``; ``close`` did it already
    unless the worker stops without closing its server)."""
    if BatchAcceptServer.board is not None:
        BatchAcceptServer.board.release()
