"""Tests of the real-process fixtures in tests/servers/ themselves."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from tests import servers
from tests.conftest import settings_for
from tests.servers import (
    MemcachedFactory,
    MemcachedProcess,
    OriginServer,
    OriginSupply,
    SharedMemcached,
    SharedMemcachedMisuse,
    child_pids,
    free_port,
    http_get,
    http_request,
    process_state,
)

# -- memcached ---------------------------------------------------------------------------------


def _version_reply(address: tuple[str, int], timeout: float) -> bytes:
    """Send ``version`` on a fresh connection and return what came back (may raise)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(b"version\r\n")
        return sock.recv(100)


@pytest.mark.memcached
@pytest.mark.private_memcached
def test_memcached_raw_set_get_roundtrip(memcached: MemcachedProcess) -> None:
    assert memcached.is_running()
    assert memcached.address == f"127.0.0.1:{memcached.port}"
    hostile = b"\x80\x04\x95 not pickle \r\nEND\r\n\x00\xff" * 3
    memcached.raw_set(b"swr:test:key", hostile, flags=7)
    assert memcached.raw_get(b"swr:test:key") == (hostile, 7)
    assert memcached.raw_get(b"swr:test:missing") is None
    stats = memcached.stats()
    assert int(stats["pid"]) == memcached.pid
    assert int(stats["curr_items"]) == 1
    assert int(stats["get_hits"]) == 1 and int(stats["get_misses"]) == 1
    assert memcached.log_path.exists()


@pytest.mark.memcached
@pytest.mark.private_memcached
def test_memcached_flush_empties_the_cache(memcached: MemcachedProcess) -> None:
    memcached.raw_set(b"a", b"1")
    memcached.flush()
    assert memcached.raw_get(b"a") is None
    # Items written right after a flush, within the same second, must still be readable.
    memcached.raw_set(b"b", b"2")
    assert memcached.raw_get(b"b") == (b"2", 0)


@pytest.mark.memcached
def test_memcached_extra_args_are_passed(memcached_factory: MemcachedFactory) -> None:
    server = memcached_factory(["-I", "2m"])
    settings = server.stats("settings")
    assert int(settings["item_size_max"]) == 2 * 1024 * 1024
    assert settings["maxconns"] == "1024" and settings["num_threads"] == "2"
    assert settings["maxbytes"] == str(64 * 1024 * 1024)
    assert settings["tcpport"] == str(server.port)
    assert settings["udpport"] == "0" and settings["inter"] == "127.0.0.1"
    big = os.urandom(1_500_000)
    server.raw_set(b"big", big)
    assert server.raw_get(b"big") == (big, 0)


@pytest.mark.memcached
def test_memcached_factory_starts_independent_servers(
    memcached_factory: MemcachedFactory,
) -> None:
    first, second = memcached_factory(), memcached_factory()
    assert first.port != second.port
    first.raw_set(b"k", b"first")
    assert second.raw_get(b"k") is None
    # Both are children of this process, as the gunicorn worker scan relies on.
    assert {first.pid, second.pid} <= set(child_pids(os.getpid()))


@pytest.mark.memcached
@pytest.mark.private_memcached
def test_memcached_freeze_and_thaw(memcached: MemcachedProcess) -> None:
    address = (memcached.host, memcached.port)
    memcached.freeze()
    assert memcached.pid is not None and process_state(memcached.pid) == "T"
    # The kernel still accepts the connection; nobody reads it.
    with pytest.raises(TimeoutError):
        _version_reply(address, timeout=0.3)
    memcached.thaw()
    assert _version_reply(address, timeout=5.0).startswith(b"VERSION")
    memcached.raw_set(b"k", b"v")
    assert memcached.raw_get(b"k") == (b"v", 0)


@pytest.mark.memcached
@pytest.mark.private_memcached
def test_memcached_stop_terminates_a_frozen_process(memcached: MemcachedProcess) -> None:
    memcached.freeze()
    code = memcached.stop()
    # SIGCONT let SIGTERM through: memcached exited by itself rather than being SIGKILLed.
    assert code is not None and code != -signal.SIGKILL
    assert not memcached.is_running()
    assert memcached.stop() == code  # idempotent


@pytest.mark.memcached
@pytest.mark.private_memcached
def test_memcached_restart_same_port_empty_cache(memcached: MemcachedProcess) -> None:
    port, old_pid = memcached.port, memcached.pid
    memcached.raw_set(b"k", b"v")
    memcached.restart()
    assert memcached.port == port
    assert memcached.pid != old_pid
    assert memcached.is_running()
    assert memcached.raw_get(b"k") is None
    assert int(memcached.stats()["pid"]) == memcached.pid


@pytest.mark.memcached
@pytest.mark.private_memcached
def test_memcached_kill_refuses_connections(memcached: MemcachedProcess) -> None:
    code = memcached.kill()
    assert code == -signal.SIGKILL
    assert not memcached.is_running()
    with pytest.raises(ConnectionRefusedError):
        _version_reply((memcached.host, memcached.port), timeout=1.0)
    with pytest.raises(ConnectionRefusedError):
        memcached.raw_get(b"k")


# -- the session's shared memcached and the per-test key prefix ------------------------------


def test_key_prefix_is_the_test_s_own_and_settings_for_uses_it(
    key_prefix: str, request: pytest.FixtureRequest
) -> None:
    assert servers.KEY_PREFIX_PATTERN.match(key_prefix)
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    assert key_prefix.startswith("t") and key_prefix.endswith("-" + digest)
    assert servers.current_key_prefix() == key_prefix
    assert settings_for(["127.0.0.1:1"]).cache.key_prefix == key_prefix


@pytest.mark.memcached
def test_shared_memcached_keeps_a_test_to_its_own_keys(memcached: SharedMemcached,
                                                       key_prefix: str) -> None:
    assert isinstance(memcached, SharedMemcached) and memcached.is_running()
    own = f"{key_prefix}:k:mine".encode()
    memcached.raw_set(own, b"v", flags=3)
    assert memcached.raw_get(own) == (b"v", 3)
    assert memcached.command_line(b"delete " + own) == b"DELETED"
    assert memcached.stats("settings")["tcpport"] == str(memcached.port)
    with pytest.raises(SharedMemcachedMisuse, match="outside this test's prefix"):
        memcached.raw_set(b"someone-else:k:theirs", b"v")
    with pytest.raises(SharedMemcachedMisuse, match="outside this test's prefix"):
        memcached.command_line(b"delete someone-else:k:theirs")
    with pytest.raises(SharedMemcachedMisuse, match="memcached_factory"):
        memcached.command_line(b"flush_all")
    for disruptive in (memcached.stop, memcached.kill, memcached.freeze, memcached.thaw,
                       memcached.restart, memcached.flush, memcached.stats):
        with pytest.raises(SharedMemcachedMisuse, match="memcached_factory"):
            disruptive()
    assert memcached.is_running()


@pytest.mark.memcached
@pytest.mark.private_memcached
def test_private_memcached_marker_gives_a_server_of_the_test_s_own(
    memcached: MemcachedProcess, session_memcached: MemcachedProcess
) -> None:
    assert isinstance(memcached, MemcachedProcess)
    assert memcached.pid != session_memcached.pid and memcached.port != session_memcached.port
    memcached.flush()                                   # allowed: nobody else uses it
    assert int(memcached.stats()["curr_items"]) == 0


def test_require_memcached_skips_or_fails_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # require_memcached looks the binary up in its own module (tests/servers/memcached.py,
    # which the package's `memcached` fixture hides as an attribute).
    module = importlib.import_module("tests.servers.memcached")
    monkeypatch.setattr(module, "memcached_binary", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install memcached"):
        servers.require_memcached()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have it"):
        servers.require_memcached()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -- origin --------------------------------------------------------------------------------------


def test_origin_counts_requests_per_path(origin_server: OriginServer) -> None:
    assert origin_server.count() == 0
    for _ in range(3):
        status, _, _ = http_get(origin_server.url + "/a?x=1")
        assert status == 200
    status, headers, body = http_get(origin_server.url + "/b")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body) == {"path": "/b", "params": {}, "n": 1}
    assert origin_server.count("/a") == 3
    assert origin_server.count("/b") == 1
    assert origin_server.count("/never") == 0
    assert origin_server.count() == 4  # /__count itself is not counted


def test_origin_default_body_reports_params_and_count(origin_server: OriginServer) -> None:
    http_get(origin_server.url + "/p")
    _, _, body = http_get(origin_server.url + "/p?q=v&empty=")
    assert json.loads(body) == {"path": "/p", "params": {"q": "v", "empty": ""}, "n": 2}


def test_origin_honours_status(origin_server: OriginServer) -> None:
    status, _, _ = http_get(origin_server.url + "/flaky?status=503")
    assert status == 503
    status, headers, body = http_get(origin_server.url + "/gone?status=204")
    assert status == 204 and body == b""
    assert origin_server.count("/flaky") == 1


def test_origin_honours_delay(origin_server: OriginServer) -> None:
    status, _, body = http_get(origin_server.url + "/slow?delay=0.2&status=201")
    assert status == 201
    assert json.loads(body)["params"]["delay"] == "0.2"
    # A client that gives up before the delay ends sees a timeout; the request still counted.
    with pytest.raises(TimeoutError):
        http_get(origin_server.url + "/slower?delay=2", timeout=0.3)
    assert origin_server.count("/slower") == 1


def test_origin_body_ctype_and_size(origin_server: OriginServer) -> None:
    _, headers, body = http_get(origin_server.url + "/t?body=hello%20world&ctype=text/html")
    assert body == b"hello world"
    assert headers["content-type"] == "text/html"
    _, headers, body = http_get(origin_server.url + "/big?size=100000")
    assert body == b"x" * 100_000
    assert headers["content-type"] == "text/plain"
    assert headers["content-length"] == "100000"
    status, _, _ = http_get(origin_server.url + "/bad?status=abc")
    assert status == 400


def test_origin_reset(origin_server: OriginServer) -> None:
    http_get(origin_server.url + "/a")
    http_get(origin_server.url + "/b")
    assert origin_server.count() == 2
    origin_server.reset()
    assert origin_server.count() == 0
    assert origin_server.count("/a") == 0
    _, _, body = http_get(origin_server.url + "/a")
    assert json.loads(body)["n"] == 1


def test_origin_keep_alive_connection(origin_server: OriginServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", origin_server.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/ka")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
    finally:
        conn.close()
    assert origin_server.count("/ka") == 3


def test_origin_supply_hands_out_a_fresh_process_each_time(tmp_path: Path) -> None:
    supply = OriginSupply(tmp_path)
    with contextlib.ExitStack() as stack:
        stack.callback(supply.close)
        first = supply.take()
        stack.callback(first.kill)
        http_get(first.url + "/a")
        second = supply.take()                          # the spare started by the first take
        stack.callback(second.kill)
        assert first.proc is not None and second.proc is not None
        assert second.proc.pid != first.proc.pid and second.port != first.port
        assert (first.count("/a"), second.count()) == (1, 0)
    assert not first.is_running() and not second.is_running()


def test_origin_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    server = OriginServer(tmp_path).start()
    try:
        assert server.is_running()
    finally:
        code = server.stop()
    assert code == 0
    with pytest.raises(ConnectionRefusedError):
        http_request("GET", server.url + "/__count", timeout=1.0)


# -- gunicorn (the app does not exist yet: only check that the fixture is importable) -----------


def test_gunicorn_factory_is_importable(tmp_path: Path) -> None:
    from tests.servers import GunicornProcess, gunicorn_binary, gunicorn_factory

    assert callable(gunicorn_factory)
    assert os.access(gunicorn_binary(), os.X_OK)
    settings = tmp_path / "settings.toml"
    proc = GunicornProcess(settings, tmp_path, workers=2, env={"EXTRA": "1"})
    argv = proc.command()
    assert argv[1:3] == ["-c", "deploy/gunicorn.conf.py"]
    assert argv[3:] == ["--bind", f"127.0.0.1:{proc.port}", "--workers", "2", "wsgi:app"]
    env = proc.environment()
    assert env["SERVICE_SETTINGS"] == str(settings) and env["EXTRA"] == "1"
    # Its gunicorn control socket lives under tmp_path, not in ~/.gunicorn.
    assert Path(env["XDG_RUNTIME_DIR"]).is_dir()
    assert Path(env["XDG_RUNTIME_DIR"]).is_relative_to(tmp_path)
    assert proc.url == f"http://127.0.0.1:{proc.port}"
    assert proc.worker_pids() == [] and not proc.is_running()
