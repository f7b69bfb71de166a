"""Real-process test fixtures: memcached, twemproxy, an HTTP origin and gunicorn.

One module each (``memcached``, ``twemproxy``, ``origin``, ``gunicorn``), over one process
base (``base.ServerProcess``: spawn with a log, wait for a readiness probe, retry when the
process exits at once, stop and reap); this package re-exports what the tests use and is
loaded as the suite's pytest plugin (``pytest_plugins = ["tests.servers"]``).

Every server here is a real process on a free loopback port, with its output in a log file
under the test's ``tmp_path`` (under the session's temporary directory for the session's
memcached and for the origins, which are started one test ahead). Starting waits on an
observable readiness probe (a socket that answers), with bounded total time; stopping sends a
signal and then ``wait()``s the process so no zombie, open pipe or ``ResourceWarning`` is left
behind. Fixture factories register every process they start on a
:class:`contextlib.ExitStack`, so teardown stops whatever a test left running, even when the
test failed half-way.

memcached is the exception to "one process per test": ``memcached`` is one server for the whole
session, shared safely because every test gets a key prefix of its own (``key_prefix``) and sees
the server through :class:`SharedMemcached`, which refuses whatever would disturb the other
tests. A test that stops, kills, freezes, restarts or flushes memcached, or reads its global
``stats``, is marked ``@pytest.mark.private_memcached`` (or uses ``memcached_factory``) and gets
a server of its own.

Only the standard library is used to talk HTTP here, so the fixtures do not depend on the code
under test. The module works both with and without gevent monkey-patching (``subprocess``,
``socket`` and ``time.sleep`` are looked up at call time, so the patched versions are used when
the conftest patched them first).
"""

from __future__ import annotations

from .base import (  # noqa: F401 - the plugin's fixtures and the tests' names
    GUNICORN_START_TIMEOUT as GUNICORN_START_TIMEOUT,
)
from .base import (
    LOOPBACK as LOOPBACK,
)
from .base import (
    MEMCACHED_START_TIMEOUT as MEMCACHED_START_TIMEOUT,
)
from .base import (
    ORIGIN_START_TIMEOUT as ORIGIN_START_TIMEOUT,
)
from .base import (
    REPO_ROOT as REPO_ROOT,
)
from .base import (
    STOP_TIMEOUT as STOP_TIMEOUT,
)
from .base import (
    ServerProcess as ServerProcess,
)
from .base import (
    _ExitedEarly as _ExitedEarly,
)
from .base import (
    _open_log as _open_log,
)
from .base import (
    _poll_intervals as _poll_intervals,
)
from .base import (
    _proc_stat as _proc_stat,
)
from .base import (
    _reap as _reap,
)
from .base import (
    _spawn as _spawn,
)
from .base import (
    _wait_for_state as _wait_for_state,
)
from .base import (
    child_pids as child_pids,
)
from .base import (
    free_port as free_port,
)
from .base import (
    http_get as http_get,
)
from .base import (
    http_request as http_request,
)
from .base import (
    log_tail as log_tail,
)
from .base import (
    process_state as process_state,
)
from .gunicorn import (  # noqa: F401 - the plugin's fixtures and the tests' names
    GunicornFactory as GunicornFactory,
)
from .gunicorn import (
    GunicornProcess as GunicornProcess,
)
from .gunicorn import (
    gunicorn_binary as gunicorn_binary,
)
from .gunicorn import (
    gunicorn_factory as gunicorn_factory,
)
from .memcached import (
    _KEYED_COMMANDS as _KEYED_COMMANDS,
)
from .memcached import (  # noqa: F401 - the plugin's fixtures and the tests' names
    KEY_PREFIX_PATTERN as KEY_PREFIX_PATTERN,
)
from .memcached import (
    PRIVATE_MEMCACHED as PRIVATE_MEMCACHED,
)
from .memcached import (
    MemcachedFactory as MemcachedFactory,
)
from .memcached import (
    MemcachedProcess as MemcachedProcess,
)
from .memcached import (
    SharedMemcached as SharedMemcached,
)
from .memcached import (
    SharedMemcachedMisuse as SharedMemcachedMisuse,
)
from .memcached import (
    _LineReader as _LineReader,
)
from .memcached import (
    current_key_prefix as current_key_prefix,
)
from .memcached import (
    key_prefix as key_prefix,
)
from .memcached import (
    memcached as memcached,
)
from .memcached import (
    memcached_binary as memcached_binary,
)
from .memcached import (
    memcached_factory as memcached_factory,
)
from .memcached import (
    pytest_configure as pytest_configure,
)
from .memcached import (
    require_memcached as require_memcached,
)
from .memcached import (
    session_memcached as session_memcached,
)
from .nginx import (  # noqa: F401 - the plugin's fixtures and the tests' names
    NginxFactory as NginxFactory,
)
from .nginx import (
    NginxProcess as NginxProcess,
)
from .nginx import (
    nginx_factory as nginx_factory,
)
from .nginx import (
    require_nginx as require_nginx,
)
from .origin import (  # noqa: F401 - the plugin's fixtures and the tests' names
    OriginServer as OriginServer,
)
from .origin import (
    OriginSupply as OriginSupply,
)
from .origin import (
    origin_server as origin_server,
)
from .origin import (
    origin_supply as origin_supply,
)
from .twemproxy import (  # noqa: F401 - the plugin's fixtures and the tests' names
    TWEMPROXY_CONFIG as TWEMPROXY_CONFIG,
)
from .twemproxy import (
    TWEMPROXY_START_TIMEOUT as TWEMPROXY_START_TIMEOUT,
)
from .twemproxy import (
    TwemproxyFactory as TwemproxyFactory,
)
from .twemproxy import (
    TwemproxyProcess as TwemproxyProcess,
)
from .twemproxy import (
    nutcracker_binary as nutcracker_binary,
)
from .twemproxy import (
    require_nutcracker as require_nutcracker,
)
from .twemproxy import (
    twemproxy_config as twemproxy_config,
)
from .twemproxy import (
    twemproxy_factory as twemproxy_factory,
)

__all__ = [
    "REPO_ROOT",
    "GunicornFactory",
    "GunicornProcess",
    "MemcachedFactory",
    "MemcachedProcess",
    "OriginServer",
    "OriginSupply",
    "PRIVATE_MEMCACHED",
    "SharedMemcached",
    "SharedMemcachedMisuse",
    "TwemproxyFactory",
    "TwemproxyProcess",
    "child_pids",
    "current_key_prefix",
    "free_port",
    "gunicorn_binary",
    "gunicorn_factory",
    "http_get",
    "http_request",
    "key_prefix",
    "log_tail",
    "memcached",
    "memcached_binary",
    "memcached_factory",
    "nutcracker_binary",
    "origin_server",
    "origin_supply",
    "process_state",
    "pytest_configure",
    "require_memcached",
    "session_memcached",
    "twemproxy_factory",
]

