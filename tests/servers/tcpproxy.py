"""A small TCP proxy that delays, "loses" and holds segments, for the fleet's network faults.

``python tests/servers/tcpproxy.py --listen HOST:PORT --target HOST:PORT --control HOST:PORT``

Standard library only, threads. Every accepted connection is paired with one to the target;
each direction has a reader thread that stamps every chunk it reads (one ``recv``: what one
or a few TCP segments delivered) with the moment it may be passed on, and a writer thread
that passes chunks on in order at those moments. The faults, set at any time through the
control port with one line each (the answer is one line starting with ``ok``):

``delay S``          every chunk waits S seconds more, each way (latency, not a throttle)
``loss P LO HI``     each chunk, with probability P, waits a further uniform(LO, HI) seconds,
                     and everything behind it waits too: what a lost segment costs a TCP
                     reader (the retransmission), without a kernel that has netem
``hold``             nothing is passed on (both ways) until ``release``: a stalled path
``release``          pass on what was held, at once
``drop``             reset every open connection (RST); new ones are accepted as usual
``reset``            no delay, no loss, no hold
``status``           ``ok connections=N chunks=N delayed=N lost=N held=N`` (counts so far)

SIGTERM or SIGINT stops it (exit 0).
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import socket
import struct
import sys
import threading
import time
import types


class Faults:
    """The current faults, shared by every pump (under one condition variable)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.delay = 0.0
        self.loss = 0.0
        self.loss_range = (0.0, 0.0)
        self.held = False
        self.counts = collections.Counter[str]()
        self.rng = random.Random(1)

    def stamp(self) -> float:
        """The moment a chunk read now may be passed on."""
        with self.cond:
            self.counts["chunks"] += 1
            extra = self.delay
            if self.delay:
                self.counts["delayed"] += 1
            if self.loss and self.rng.random() < self.loss:
                self.counts["lost"] += 1
                extra += self.rng.uniform(*self.loss_range)
        return time.monotonic() + extra


class Pump:
    """One direction of one connection: a reader stamps chunks, a writer sends them in order."""

    def __init__(self, faults: Faults, src: socket.socket, dst: socket.socket,
                 on_close: threading.Event) -> None:
        self.faults = faults
        self.src, self.dst = src, dst
        self.closed = on_close
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self.read, daemon=True).start()
        threading.Thread(target=self.write, daemon=True).start()

    def read(self) -> None:
        try:
            while not self.closed.is_set():
                data = self.src.recv(65536)
                if not data:
                    break
                due = self.faults.stamp()
                with self.ready:
                    # In order: a chunk never overtakes the one before it (TCP's order).
                    if self.queue:
                        due = max(due, self.queue[-1][0])
                    self.queue.append((due, data))
                    self.ready.notify()
        except OSError:
            pass
        with self.ready:
            self.queue.append((0.0, b""))  # end of stream
            self.ready.notify()

    def write(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.queue:
                        self.ready.wait()
                    due, data = self.queue[0]
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with self.faults.cond:
                    if self.faults.held:
                        self.faults.counts["held"] += 1
                    while self.faults.held and not self.closed.is_set():
                        self.faults.cond.wait(0.5)
                if self.closed.is_set():
                    return
                self.dst.sendall(data)
                with self.ready:
                    self.queue.popleft()
        except OSError:
            self.closed.set()


class Proxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int],
                 control: tuple[str, int]) -> None:
        self.target = target
        self.faults = Faults()
        self.connections: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.listener = socket.create_server(listen, backlog=256, reuse_port=False)
        self.controller = socket.create_server(control, backlog=16)

    def serve(self) -> None:
        threading.Thread(target=self.serve_control, daemon=True).start()
        self.listener.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self.connect, args=(client,), daemon=True).start()
        self.listener.close()

    def connect(self, client: socket.socket) -> None:
        client.settimeout(None)
        try:
            upstream = socket.create_connection(self.target, timeout=5.0)
        except OSError:
            self.reset(client)
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        closed = threading.Event()
        with self.lock:
            self.faults.counts["connections"] += 1
            self.connections = [c for c in self.connections if not c[2].is_set()]
            self.connections.append((client, upstream, closed))
        Pump(self.faults, client, upstream, closed).start()
        Pump(self.faults, upstream, client, closed).start()

    @staticmethod
    def reset(sock: socket.socket) -> None:
        """Close with an RST (linger 0), as a dropped path looks to both ends."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass

    def drop_all(self) -> None:
        with self.lock:
            connections, self.connections = self.connections, []
        for client, upstream, closed in connections:
            closed.set()
            self.reset(client)
            self.reset(upstream)

    def serve_control(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.controller.accept()
            except OSError:
                return
            with conn:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    line += chunk
                conn.sendall((self.command(line.decode().split()) + "\n").encode())

    def command(self, words: list[str]) -> str:
        f = self.faults
        try:
            with f.cond:
                if words[:1] == ["delay"]:
                    f.delay = float(words[1])
                elif words[:1] == ["loss"]:
                    f.loss, f.loss_range = float(words[1]), (float(words[2]), float(words[3]))
                elif words == ["hold"]:
                    f.held = True
                elif words == ["release"]:
                    f.held = False
                    f.cond.notify_all()
                elif words == ["reset"]:
                    f.delay, f.loss, f.held = 0.0, 0.0, False
                    f.cond.notify_all()
                elif words == ["status"]:
                    pass
                elif words != ["drop"]:
                    return f"error: unknown command {' '.join(words)!r}"
                counts = " ".join(f"{k}={f.counts[k]}"
                                  for k in ("connections", "chunks", "delayed", "lost",
                                            "held"))
        except (IndexError, ValueError) as exc:
            return f"error: {exc}"
        if words == ["drop"]:
            self.drop_all()
        return f"ok {counts}"


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, type=address)
    parser.add_argument("--target", required=True, type=address)
    parser.add_argument("--control", required=True, type=address)
    args = parser.parse_args(argv)
    proxy = Proxy(args.listen, args.target, args.control)

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        proxy.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    proxy.serve()
    proxy.drop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
