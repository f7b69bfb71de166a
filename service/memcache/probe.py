"""``python -m service.memcache.probe [--wait SECONDS] HOST:PORT``: does a memcached answer there?

Used by ``make run`` to decide whether to start a local memcached. Exit status 0 when a
``version`` command is answered, 1 otherwise. With ``--wait``, retries until it answers
or the time is up.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"version\r\n")
            return sock.recv(64).startswith(b"VERSION")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.memcache.probe")
    parser.add_argument("address", help="HOST:PORT of a memcached")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to keep trying")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    deadline = time.monotonic() + args.wait
    delay = 0.05
    while True:
        if answers(host, int(port)):
            return 0
        if time.monotonic() >= deadline:
            return 1
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


if __name__ == "__main__":
    sys.exit(main())
