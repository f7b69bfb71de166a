"""Shared fixtures.

The test process is monkey-patched first, like a gunicorn gevent worker, so that
greenlets in tests really interleave on sockets the way they do in production.

Every test runs under two rules enforced here and in tests/servers/:

- its keys live under a prefix of its own (``settings_for`` uses it), so all tests can share
  the session's one memcached;
- every greenlet it started is finished when it ends (``no_leaked_greenlets``), so nothing it
  left behind can run, block or be blamed in a later test.
"""

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402
import pytest  # noqa: E402
from flask import Flask  # noqa: E402
from gevent.hub import Hub  # noqa: E402
from gevent.threadpool import ThreadPool  # noqa: E402

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
    state = app.extensions.get("service")
    if state is None:
        return
    state.refresher.stop(timeout=5)
    fetchers = state.extra.get("fetchers")
    if fetchers is not None:
        fetchers.close()
    state.pool.close()


def stop_hub_monitor() -> None:
    """Stop the hub's blocking monitor thread (``service.observe.monitor.start``) and its greenlet
    tracer, so a test that started one leaves no thread behind."""
    from service.observe import monitor

    monitor.stop()
    hub = gevent.get_hub()
    thread = hub.periodic_monitoring_thread
    if thread is not None:
        thread.kill()
        hub.periodic_monitoring_thread = None
    gevent.config.monitor_thread = False


@pytest.fixture
def make_app() -> Iterator[Callable[..., Flask]]:
    """Build apps for given settings; each is stopped afterwards (:func:`stop_app`)."""
    apps: list[Flask] = []

    def make(settings: Settings, clock: Callable[[], float] | None = None) -> Flask:
        app = create_app(settings, clock=clock) if clock else create_app(settings)
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
    """A clock the test moves by hand: ``clock()`` reads it, ``clock.advance(s)`` moves it.

    memcached's own clock cannot follow it, so the read path does not let memcached's
    remaining TTLs bound an entry's age from above under it (``server_ages``).
    """

    server_ages = False

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --------------------------------------------------------------------------------------------
# Greenlet leaks
# --------------------------------------------------------------------------------------------

# How long a test's leftover greenlets may take to finish by themselves (a fetch whose gate
# the test opened at its end, a kill still being delivered) before they count as leaked.
LEAK_GRACE = 2.0


def _thread_root(glet: greenlet.greenlet) -> greenlet.greenlet:
    """The main greenlet of the thread ``glet`` belongs to."""
    while glet.parent is not None:
        glet = glet.parent
    return glet


def _is_internal(glet: greenlet.greenlet) -> bool:
    """gevent's own greenlets: hubs, thread-pool workers and the pool's manager."""
    if isinstance(glet, Hub | ThreadPool._WorkerGreenlet):
        return True
    owner = getattr(getattr(glet, "_run", None), "__self__", None)
    return isinstance(owner, ThreadPool)


def live_greenlets() -> list[greenlet.greenlet]:
    """Greenlets of this thread that are running or scheduled to run, but gevent's own."""
    root = _thread_root(greenlet.getcurrent())
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance asks a weakref proxy for its __class__, and
        # a proxy whose object is gone raises ReferenceError.
        if not issubclass(type(obj), greenlet.greenlet) or obj.parent is None:
            continue  # not a greenlet, or a thread's main greenlet
        if isinstance(obj, gevent.Greenlet):
            alive = bool(obj) and not obj.dead  # started or scheduled, not finished
        else:
            alive = bool(obj)                   # started, not finished
        if alive and not _is_internal(obj) and _thread_root(obj) is root:
            found.append(obj)
    return found


def describe_greenlet(glet: greenlet.greenlet) -> str:
    """The function a greenlet runs (its outermost Python frame) and where it waits now."""
    frames = []
    frame = glet.gr_frame
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    if not frames:
        run = getattr(glet, "_run", None) or getattr(glet, "run", None)
        func = getattr(run, "__func__", run)
        return f"{getattr(func, '__qualname__', repr(glet))} (not started yet)"
    outer, inner = frames[-1], frames[0]
    return (f"{outer.f_code.co_qualname} ({outer.f_code.co_filename}:"
            f"{outer.f_code.co_firstlineno}), waiting in {inner.f_code.co_qualname} at "
            f"{inner.f_code.co_filename}:{inner.f_lineno}")


@pytest.fixture(autouse=True)
def joiners_stopped() -> Iterator[None]:
    """The large-value join threads a test made (on first use) are stopped after it."""
    yield
    from service.memcache.chunks import stop_joiners

    stop_joiners()


@pytest.fixture(autouse=True)
def no_leaked_greenlets() -> Iterator[None]:
    """Fail a test that leaves a greenlet running, after killing it.

    The greenlets alive after the test's own fixtures were torn down (apps stopped through
    :func:`stop_app`), and not alive before it started, get ``LEAK_GRACE`` seconds to finish;
    whatever still runs then is killed and named in the failure.
    """
    before = weakref.WeakSet(live_greenlets())
    yield
    leaked = [g for g in live_greenlets() if g not in before]
    if not leaked:
        return
    gc.collect()  # an abandoned, unreachable greenlet is collected (and so finished) here
    gevent.joinall([g for g in leaked if isinstance(g, gevent.Greenlet)], timeout=LEAK_GRACE)
    leaked = [g for g in live_greenlets() if g not in before]
    if not leaked:
        return
    names = [describe_greenlet(g) for g in leaked]
    for glet in leaked:
        if isinstance(glet, gevent.Greenlet):
            glet.kill(block=True, timeout=1)
        else:
            gevent.kill(glet)
    gevent.sleep(0)
    pytest.fail(
        f"{len(names)} greenlet(s) started by this test outlived it (and its fixtures' "
        f"teardown, plus {LEAK_GRACE:g}s of grace); now killed:\n  " + "\n  ".join(names),
        pytrace=False,
    )
