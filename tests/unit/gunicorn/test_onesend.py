"""``service.gunicorn.onesend``: a response's head leaves with its first body bytes, in one
``sendall``; the bytes on the wire are gunicorn's own, in the same order, whatever the
response (a body, none, HEAD, chunked, a large one, a file)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi

from service.gunicorn import onesend


class Sock:
    """A socket that records each ``sendall`` (and ``sendfile``) in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def sendall(self, data: bytes) -> None:
        self.calls.append(("sendall", bytes(data)))

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        file.seek(offset)
        data = file.read(count)
        self.calls.append(("sendfile", data))
        return len(data)

    @property
    def wire(self) -> bytes:
        return b"".join(data for _, data in self.calls)


class Request:
    def __init__(self, method: str = "GET", version: tuple[int, int] = (1, 1)) -> None:
        self.method = method
        self.version = version
        self.headers: list[tuple[str, str]] = []
        self.path = "/"

    def should_close(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both responses of a comparison must carry the same Date header.
    monkeypatch.setattr(wsgi.util, "http_date", lambda *a: "Sun, 06 Dec 2026 10:00:00 GMT")


OneSend = onesend.response_class(wsgi.Response)


def answer(cls: type, body: list[bytes], headers: list[tuple[str, str]],
           method: str = "GET") -> Sock:
    sock = Sock()
    resp = cls(Request(method), sock, Config())
    resp.start_response("200 OK", headers)
    for piece in body:
        resp.write(piece)
    resp.close()
    return sock


SMALL = b'{"answer": 42}'
CASES = {
    "a body of one piece": ([SMALL], [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(SMALL)))], "GET"),
    "an empty body": ([b""], [("Content-Length", "0")], "GET"),
    "no body at all": ([], [("Content-Length", "0")], "GET"),
    "HEAD": ([SMALL], [("Content-Length", str(len(SMALL)))], "HEAD"),
    "chunked, three pieces": ([b"one", b"two", b"three"], [("Content-Type", "text/plain")],
                              "GET"),
    "several pieces": ([b"ab", b"cd"], [("Content-Length", "4")], "GET"),
    "a large body": ([b"x" * (onesend.JOIN_LIMIT + 1)],
                     [("Content-Length", str(onesend.JOIN_LIMIT + 1))], "GET"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_wire_carries_gunicorns_own_bytes_in_the_same_order(case: str) -> None:
    body, headers, method = CASES[case]
    ours = answer(OneSend, body, headers, method)
    theirs = answer(wsgi.Response, body, headers, method)
    assert ours.wire == theirs.wire
    assert ours.wire.startswith(b"HTTP/1.1 200 OK\r\n")


def test_the_head_leaves_with_the_first_body_bytes_in_one_send() -> None:
    body, headers, method = CASES["a body of one piece"]
    theirs = answer(wsgi.Response, body, headers, method)
    ours = answer(OneSend, body, headers, method)
    assert len(theirs.calls) == 2          # gunicorn: the head, then the body
    assert len(ours.calls) == 1            # here: both at once
    assert ours.calls[0][1].endswith(b"\r\n\r\n" + SMALL)


def test_a_response_without_body_bytes_sends_its_head_at_close() -> None:
    for case in ("an empty body", "no body at all", "HEAD"):
        body, headers, method = CASES[case]
        ours = answer(OneSend, body, headers, method)
        assert len(ours.calls) == 1, case
        assert ours.wire.endswith(b"\r\n\r\n"), case


def test_later_pieces_and_a_large_first_piece_go_as_gunicorn_sends_them() -> None:
    chunked = answer(OneSend, *CASES["chunked, three pieces"][:2])
    assert len(chunked.calls) == 4         # head and first chunk, two chunks, the last one
    large = answer(OneSend, *CASES["a large body"][:2])
    assert [len(data) for _, data in large.calls][1] == onesend.JOIN_LIMIT + 1
    assert large.calls[0][1].endswith(b"\r\n\r\n")   # the head alone, then the body


def test_a_file_sent_by_the_kernel_never_overtakes_the_head() -> None:
    content = b"file content"

    def send(cls: type) -> Sock:
        sock = Sock()
        resp = cls(Request(), sock, Config())
        resp.start_response("200 OK", [("Content-Length", str(len(content)))])
        wrapper = wsgi.FileWrapper(io.BytesIO(content))
        wrapper.filelike.fileno = lambda: _fileno(content)  # type: ignore[attr-defined]
        resp.write_file(wrapper)
        resp.close()
        return sock

    ours, theirs = send(OneSend), send(wsgi.Response)
    assert [kind for kind, _ in ours.calls] == [kind for kind, _ in theirs.calls] \
        == ["sendall", "sendfile"]
    assert ours.wire == theirs.wire


def _fileno(content: bytes) -> int:
    # A real file descriptor positioned at 0 whose size is the content's: gunicorn's
    # sendfile path reads its offset and size from it.
    import os
    import tempfile

    fd, path = tempfile.mkstemp()
    os.write(fd, content)
    os.lseek(fd, 0, os.SEEK_SET)
    os.unlink(path)
    _open_fds.append(fd)
    return fd


_open_fds: list[int] = []


@pytest.fixture(autouse=True)
def close_fds() -> Iterator[None]:
    yield
    import os

    while _open_fds:
        os.close(_open_fds.pop())


def test_install_swaps_the_class_gunicorn_builds_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wsgi, "Response", wsgi.Response)   # restored after the test
    original = wsgi.Response
    onesend.install()
    made = wsgi.Response
    assert made is not original and issubclass(made, original)
    onesend.install()
    assert wsgi.Response is made           # not wrapped twice
    resp, _ = wsgi.create(_parsed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"), Sock(), ("1.2.3.4", 5),
                          ("127.0.0.1", 8000), Config())
    assert isinstance(resp, made)


def _parsed(raw: bytes) -> Any:
    from gunicorn.http.parser import RequestParser

    return next(iter(RequestParser(Config(), iter([raw]), ("1.2.3.4", 5))))
