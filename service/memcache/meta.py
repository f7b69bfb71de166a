"""memcached's meta commands (``mg``, ``ms``, ``md``) on a pymemcache client's socket.

Why our own codec: pymemcache 4 has no meta API, and its ``raw_command`` reads a single
line, so a ``VA <size>`` reply (a value follows) leaves the data block on the socket and
the next command reads it as its answer. This module writes one command, reads exactly
its reply (the status line, and the data block when there is one) and leaves nothing
behind. The socket is the client's own (opened with its timeouts, gevent-cooperative in
a patched worker), so the connection's error boundary (:meth:`Connection.call`) sees the
same exceptions as for any classic command.

What we rely on, from memcached 1.6.18's ``doc/protocol.txt``:

* ``mg <key> v c t N<ttl>``: on a miss the server creates an empty item with that TTL and
  hands exactly one client the win (``W``); everyone else sees the empty item with ``Z``.
  That empty item *is* the lease: it lives on the key's own server, expires by the
  server's clock, and its CAS is the fence.
* ``ms <key> <len> C<cas> T<ttl>``: stores only while the item still has that CAS:
  ``HD`` stored, ``EX`` somebody wrote or invalidated in between, ``NF`` it was deleted.
* ``ms <key> <len> ME``: add (``NS`` when the key exists); ``md <key> C<cas>``: delete
  only while unchanged.

Parsing is pure (:func:`parse_status`) and unit-tested; :func:`command` does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
)

_RECV = 65536
CODES = frozenset({b"VA", b"HD", b"EN", b"NS", b"EX", b"NF", b"MN"})


@dataclass(frozen=True)
class Reply:
    """One meta reply: its code (``VA``, ``HD``, ``EN``, ``NS``, ``EX``, ``NF``), the
    returned flags (one letter each; the token after it, ``""`` when none) and the data
    block of a ``VA`` reply."""

    code: bytes
    flags: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None

    @property
    def won(self) -> bool:
        """This client got the win: it (and nobody else) should recache the item."""
        return "W" in self.flags

    @property
    def contended(self) -> bool:
        """Another client already got the win for this item."""
        return "Z" in self.flags

    @property
    def cas(self) -> bytes | None:
        token = self.flags.get("c")
        return token.encode("ascii") if token and token != "0" else None

    @property
    def ttl(self) -> int | None:
        """Remaining TTL in whole seconds by the server's clock (``-1``: none), when asked
        with ``t``; ``None`` when not returned."""
        token = self.flags.get("t")
        try:
            return int(token) if token is not None else None
        except ValueError:
            return None


def parse_status(line: bytes) -> tuple[bytes, int | None, dict[str, str]]:
    """``(code, data size or None, flags)`` of a meta reply's status line.

    :raises MemcacheUnknownCommandError: ``ERROR`` (a server that has no meta commands).
    :raises MemcacheClientError: ``CLIENT_ERROR`` (our command was malformed or refused).
    :raises MemcacheServerError: ``SERVER_ERROR``, or a line that is no meta reply.
    """
    if line == b"ERROR":
        raise MemcacheUnknownCommandError(line.decode("ascii", "replace"))
    if line.startswith(b"CLIENT_ERROR"):
        raise MemcacheClientError(line.decode("ascii", "replace"))
    if line.startswith(b"SERVER_ERROR"):
        raise MemcacheServerError(line.decode("ascii", "replace"))
    parts = line.split()
    if not parts or parts[0] not in CODES:
        raise MemcacheServerError(f"not a meta reply: {line[:80]!r}")
    code, rest = parts[0], parts[1:]
    size = None
    if code == b"VA":
        if not rest or not rest[0].isdigit():
            raise MemcacheServerError(f"VA without a size: {line[:80]!r}")
        size, rest = int(rest[0]), rest[1:]
    flags = {}
    for token in rest:
        text = token.decode("ascii", "replace")
        flags[text[0]] = text[1:]
    return code, size, flags


def command(client: Client, head: bytes, payload: bytes | None = None) -> Reply:
    """Send one meta command (``head`` without its line end, and ``payload`` for ``ms``)
    and read its whole reply.

    :raises MemcacheError: as :func:`parse_status`, or the server closed the connection.
    :raises OSError: the socket failed or timed out.
    """
    if client.sock is None:
        client._connect()  # noqa: SLF001 - opens the socket with the client's timeouts
    sock = client.sock
    assert sock is not None
    out = head + b"\r\n"
    if payload is not None:
        out += payload + b"\r\n"
    sock.sendall(out)
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(_RECV)
        if not chunk:
            raise MemcacheUnexpectedCloseError()
        buf += chunk
    line, _, buf = buf.partition(b"\r\n")
    code, size, flags = parse_status(line)
    if size is None:
        return Reply(code, flags)
    need = size + 2
    parts = [buf]
    have = len(buf)
    while have < need:
        chunk = sock.recv(max(_RECV, need - have))
        if not chunk:
            raise MemcacheUnexpectedCloseError()
        parts.append(chunk)
        have += len(chunk)
    data = b"".join(parts)
    if data[size:need] != b"\r\n":
        raise MemcacheServerError("a meta value block not ended by CRLF")
    return Reply(code, flags, data[:size])
