"""A response's head and body in one ``send``, in the gevent worker.

gunicorn writes a response's head (status line and headers) with one ``sendall`` and then
each piece of its body with another; and gevent's ``sendall`` asks the kernel for the
socket's send buffer size every time. A cache hit or a small view is one piece, so each
answer cost four system calls and went out as two TCP segments. Here the head waits for
the first piece of the body and leaves with it: two system calls, one segment.
Measured with ``python -m bench.ab`` (``bench/findings.md``).

:func:`install` swaps the class ``gunicorn.http.wsgi.create`` builds, in the worker only
(``service.gunicorn.worker.post_worker_init`` calls it). Everything else is gunicorn's:
the head is made by its own ``send_headers``; only where it goes changes
(:class:`_HeadFirst`, the response's socket).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: Bodies up to this size are joined to the head (one copy of the body); a larger first
#: piece goes in its own ``sendall`` after the head, as gunicorn sends it.
JOIN_LIMIT = 64 * 1024


class _HeadFirst:
    """The socket of one response: the head (the ``sendall`` made while :attr:`holding`)
    waits for the next bytes and goes with them. Any other use of the socket
    (``sendfile``, ``send``...) sends the head first, so nothing can overtake it."""

    __slots__ = ("sock", "head", "holding")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.head: bytes | None = None
        self.holding = False

    def sendall(self, data: Any) -> None:
        if self.holding:
            # The head itself, written by gunicorn's send_headers: it waits.
            self.holding = False
            self.head = bytes(data)
            return
        head = self.head
        if head is None:
            self.sock.sendall(data)
            return
        self.head = None
        if len(data) <= JOIN_LIMIT:
            self.sock.sendall(head + bytes(data))
        else:
            self.sock.sendall(head)
            self.sock.sendall(data)

    def flush(self) -> None:
        """Send the head if it still waits (a response without body bytes)."""
        head, self.head = self.head, None
        if head is not None:
            self.sock.sendall(head)

    def __getattr__(self, name: str) -> Any:
        self.flush()
        return getattr(self.sock, name)


def response_class(base: type) -> type:
    """gunicorn's ``Response`` (``base``), its head sent with the first body bytes."""

    class OneSendResponse(base):  # type: ignore[misc]
        """gunicorn's response; see the module's docstring."""

        def __init__(self, req: Any, sock: Any, cfg: Any, *args: Any) -> None:
            super().__init__(req, _HeadFirst(sock), cfg, *args)

        def send_headers(self) -> None:
            if not self.headers_sent:
                self.sock.holding = True
            try:
                super().send_headers()
            finally:
                self.sock.holding = False

        def close(self) -> None:
            super().close()
            self.sock.flush()   # a response with no body bytes: its head alone

    OneSendResponse.__name__ = OneSendResponse.__qualname__ = f"OneSend{base.__name__}"
    return OneSendResponse


def install() -> None:
    """Make gunicorn's ``wsgi.create`` build :func:`response_class` responses, in this
    process (a worker); once."""
    from gunicorn.http import wsgi

    current = wsgi.Response
    if getattr(current, "_swr_one_send", False):
        return
    if not (isinstance(current, type) and hasattr(current, "send_headers")
            and hasattr(current, "close")):
        log.warning("gunicorn's wsgi.Response is not the class this module knows: "
                    "heads and bodies are sent as gunicorn sends them")
        return
    made = response_class(current)
    made._swr_one_send = True  # type: ignore[attr-defined]
    wsgi.Response = made
