"""Shared fixtures.

The test process is monkey-patched first, like a gunicorn gevent worker, so that
greenlets in tests really interleave on sockets the way they do in production.
"""

from gevent import monkey

monkey.patch_all()

from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from flask import Flask  # noqa: E402

from service import create_app  # noqa: E402
from service.config import Settings, parse_settings  # noqa: E402

# memcached, memcached_factory, key_prefix, origin_server, gunicorn_factory: real processes.
pytest_plugins = ["tests.servers"]


def settings_for(servers: list[str], **sections: dict[str, Any]) -> Settings:
    """Settings for tests: the given memcached servers, the running test's own key prefix
    (the ``key_prefix`` fixture) and short, test-friendly timeouts."""
    # Imported here, not at the top: tests.servers is loaded as a plugin (pytest_plugins),
    # which must come first for pytest to rewrite its asserts.
    from tests.servers import current_key_prefix

    data: dict[str, Any] = {
        "cache": {"servers": servers, "key_prefix": current_key_prefix(),
                  "connect_timeout": 0.5, "timeout": 0.5, "pool_size": 4,
                  "pool_timeout": 2.0, "circuit_reset": 0.2},
    }
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    return parse_settings(data, "<test>")


def stop_app(app: Flask) -> None:
    """Stop what an app started in this process: drain its refresher (and its periodic
    loops), stop its fetchers' child processes, close its memcached pool. Idempotent.

    The one place that knows where an app keeps these, for every fixture that builds apps.
    """
    swr = app.extensions.get("service.swr")
    if swr is not None:
        swr.refresher.stop(timeout=5)
    fetchers = app.extensions.get("service.fetchers")
    if fetchers is not None:
        fetchers.close()
    clients = app.extensions.get("service.clients")
    if clients is not None and clients.get("pool") is not None:
        clients["pool"].close()


@pytest.fixture
def make_app() -> Iterator[Callable[..., Flask]]:
    """Build apps for given settings; each is stopped afterwards (:func:`stop_app`)."""
    apps: list[Flask] = []

    def make(settings: Settings) -> Flask:
        app = create_app(settings)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        stop_app(app)


@pytest.fixture
def app(memcached: Any, make_app: Callable[..., Flask]) -> Flask:
    return make_app(settings_for([memcached.address]))


class FakeClock:
    """A clock the test moves by hand: ``clock()`` reads it, ``clock.advance(s)`` moves it."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
