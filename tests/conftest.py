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

# memcached, memcached_factory, origin_server, gunicorn_factory: real processes.
pytest_plugins = ["tests.servers"]


def settings_for(servers: list[str], **sections: dict[str, Any]) -> Settings:
    """Settings for tests: the given memcached servers and short, test-friendly timeouts."""
    data: dict[str, Any] = {
        "cache": {"servers": servers, "key_prefix": "test", "connect_timeout": 0.5,
                  "timeout": 0.5, "pool_size": 4, "pool_timeout": 2.0,
                  "circuit_reset": 0.2},
    }
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    return parse_settings(data, "<test>")


@pytest.fixture
def make_app() -> Iterator[Callable[..., Flask]]:
    """Build apps for given settings; their pools are closed afterwards."""
    apps: list[Flask] = []

    def make(settings: Settings, clock: Callable[[], float] | None = None) -> Flask:
        app = create_app(settings, clock=clock) if clock else create_app(settings)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        stop_app(app)


def stop_app(app: Flask) -> None:
    """Stop what an app started in this process: its refresher and its memcached pool."""
    state = app.extensions.get("service")
    if state is not None:
        state.refresher.stop(timeout=2)
        state.pool.close()


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
