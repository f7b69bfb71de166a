"""``flask swr``: the admin's functions from a shell, against real memcached.

Each command runs in an app of its own (``cli``), as ``flask --app …`` runs in a process
of its own, beside the app that serves (``worker``): both on one memcached and one key
prefix, so what the command sees and does is what another process of the fleet did.
The last test runs ``flask --app wsgi swr`` for real against gunicorn's workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
from click.testing import Result
from flask import Flask, jsonify

from service import SWR
from service.admin import routes as admin
from service.flask.state import state_of
from service.memcache.keys import digest
from tests.conftest import settings_for, stop_app
from tests.servers import REPO_ROOT, http_get

pytestmark = pytest.mark.memcached

L1_TTL = 0.05
SOURCES = {"double": {"kind": "python", "target": "tests.sources_fixtures:double",
                      "executor": "thread", "max_age": 60, "stale_while_revalidate": 600},
           "typed": {"kind": "python", "target": "tests.sources_fixtures:typed",
                     "executor": "thread", "max_age": 60}}


def swr(app: Flask, *args: str) -> Result:
    """``flask swr ARGS`` in ``app``, as the command line runs it."""
    return app.test_cli_runner().invoke(args=["swr", *args])


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def as_json(result: Result) -> Any:
    return json.loads(ok(result))


@pytest.fixture
def service(memcached: Any, make_app: Callable[..., Flask]) -> tuple[Flask, Flask]:
    """The service twice on one memcached: a worker that serves and the CLI's process."""
    # l1_ttl: how long a worker may answer from its own copy after an invalidation.
    settings = settings_for([memcached.address], sources=SOURCES, cache={"l1_ttl": L1_TTL})
    return make_app(settings), make_app(settings)


def past_l1_ttl() -> None:
    """Let the worker's own copy age past ``l1_ttl``, after which it asks memcached."""
    gevent.sleep(L1_TTL + 0.02)


def test_warm_entries_show_refresh_invalidate_a_v1_source(service: tuple[Flask, Flask]
                                                          ) -> None:
    worker, cli = service
    assert "MISS double x=4" in ok(swr(cli, "warm", "double", "x=4"))
    # The worker finds it stored by the CLI's load.
    answer = worker.test_client().get("/v1/double?x=4")
    assert answer.headers["X-Cache"] == "HIT" and answer.get_json() == 8

    table = ok(swr(cli, "entries"))
    assert table.splitlines()[0].split() == ["id", "source", "params", "state", "age",
                                             "tiers", "last", "refresh"]
    assert "double  x=4" in table and "fresh" in table and "1 of 1 entry (fleet)" in table
    listed = as_json(swr(cli, "entries", "--json", "--source", "double", "--state", "fresh"))
    (row,) = listed["entries"]
    assert row["params"] == {"x": "4"} and row["in_memcached"] is True
    assert as_json(swr(cli, "entries", "--json", "--state", "stale"))["entries"] == []

    by_prefix = as_json(swr(cli, "show", row["id"][:10], "--json"))
    assert by_prefix["key"] == row["key"] and by_prefix["state"] == "fresh"
    assert "state           fresh" in ok(swr(cli, "show", row["key"]))

    assert as_json(swr(cli, "refresh", "double", "x=4", "--json"))["scheduled"] is True

    done = as_json(swr(cli, "invalidate", "double", "x=4", "--json"))
    assert done == {"invalidated": "entry", "source": "double", "params": {"x": "4"},
                    "entries": 1}
    past_l1_ttl()
    assert worker.test_client().get("/v1/double?x=4").headers["x-cache"] == "MISS"


def test_invalidate_a_whole_source_and_the_refusals(service: tuple[Flask, Flask]) -> None:
    worker, cli = service
    client = worker.test_client()
    for x in (1, 2):
        assert client.get(f"/v1/double?x={x}").headers["x-cache"] == "MISS"
    state_of(worker).extra["registry"].flush()  # what the worker's reporter does
    assert "invalidated source double: 2 entries listed" in ok(swr(cli, "invalidate", "double"))
    past_l1_ttl()
    assert client.get("/v1/double?x=1").headers["x-cache"] == "MISS"

    nothing = swr(cli, "invalidate", "nothing-here")
    assert nothing.exit_code == 1
    assert "no source, view or function named 'nothing-here' has entries" in nothing.output
    bad = swr(cli, "warm", "typed", "n=abc")
    assert bad.exit_code == 1 and "parameter 'n' must be" in bad.output, bad.output
    usage = swr(cli, "warm", "double", "x")
    assert usage.exit_code == 2 and "'x' is not NAME=VALUE" in usage.output
    assert swr(cli, "show", "no-such-id").exit_code == 1


def test_stats_name_the_servers_and_count_what_this_process_served(
        service: tuple[Flask, Flask], memcached: Any) -> None:
    worker, cli = service
    worker.test_client().get("/v1/double?x=3")
    stats = as_json(swr(worker, "stats", "--json"))
    (server,) = stats["servers"]
    assert server["server"] == memcached.address and server["up"] is True
    assert stats["sources"]["double"]["requests"]["total"] >= 1
    text = ok(swr(cli, "stats"))
    assert "memcached servers:" in text and memcached.address in text and " up " in text


def test_memcached_out_of_reach_is_one_clear_failure(make_app: Callable[..., Flask],
                                                     unused_address: str) -> None:
    for n, args in enumerate((("stats",), ("entries", "--json"), ("invalidate", "double"),
                              ("warm", "double", "x=1"))):
        # An app per command, as each command is a process of its own.
        result = swr(make_app(settings_for([unused_address], sources=SOURCES)), *args)
        assert result.exit_code == 1, (args, result.output)
        message = result.output
        assert f"memcached {unused_address} is unreachable" in message, message
        # The first failure says why; this test process keeps the server's circuit open
        # after it (a command's own process has only ever the first).
        assert "Connection refused" in message if n == 0 else "circuit open" in message
        assert "[cache] servers of the settings given to the app (<test>)" in message
        assert "Traceback" not in message


@pytest.fixture
def unused_address() -> str:
    from tests.servers import free_port

    return f"127.0.0.1:{free_port()}"


# -- a library app ------------------------------------------------------------------------------

def library_app(memcached: Any, with_admin: bool = True) -> Flask:
    app = Flask("cli_library_app")
    app.config["CACHE_MEMCACHED_SERVERS"] = [memcached.address]
    swr_ext = SWR()

    @app.get("/report")
    @swr_ext.cached(max_age=60, stale_while_revalidate=600)
    def report() -> Any:
        return jsonify(ok=True)

    swr_ext.init_app(app, settings_for([memcached.address], cache={"l1_ttl": L1_TTL}))
    if with_admin:
        app.register_blueprint(admin.bp)
    return app


def test_a_library_app_gets_the_group_from_init_app(memcached: Any) -> None:
    worker, cli = library_app(memcached), library_app(memcached)
    try:
        assert "swr" in cli.cli.commands
        worker.test_client().get("/report")
        state_of(worker).extra["registry"].flush()  # what the worker's reporter does
        rows = as_json(swr(cli, "entries", "--json"))["entries"]
        assert [(r["source"], r["kind"], r["state"]) for r in rows] == [
            ("report", "view", "fresh")]
        # A view is computed by its own code: refreshed by marking it stale.
        assert as_json(swr(cli, "refresh", "report", "--json"))["marked_stale"] is True
        assert as_json(swr(cli, "invalidate", "report", "--json"))["entries"] == 1
        past_l1_ttl()
        assert worker.test_client().get("/report").headers["x-cache"] == "MISS"
        refused = swr(cli, "warm", "report")
        assert refused.exit_code == 1 and "not a /v1 source" in refused.output
    finally:
        stop_app(worker)
        stop_app(cli)


def test_without_the_admin_the_group_says_what_to_add(memcached: Any) -> None:
    code = ("import sys; from flask import Flask; from service import SWR; "
            "app = Flask('bare'); SWR(app); "
            "from click.testing import CliRunner; "
            "r = app.test_cli_runner().invoke(args=['swr', 'stats']); "
            "print(r.exit_code, r.output)")
    # A process of its own: this one imported the admin, whose commands are in the group.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO_ROOT, check=True).stdout
    assert out.startswith("2 ") and "register_blueprint(admin.bp)" in out, out


def test_an_app_without_init_app_is_told_so(memcached: Any) -> None:
    from service.flask import cli as flaskcli

    app = Flask("no_init")
    app.cli.add_command(flaskcli.swr)
    result = app.test_cli_runner().invoke(args=["swr", "stats"])
    assert result.exit_code == 1 and "never called swr.init_app(app)" in result.output


# -- for real: a subprocess against gunicorn's workers ---------------------------------------------

@pytest.mark.gunicorn
def test_an_invalidation_from_the_command_line_reaches_the_workers(
        memcached: Any, gunicorn_factory: Any, tmp_path: Path) -> None:
    from tests.servers import current_key_prefix

    settings = tmp_path / "settings.toml"
    settings.write_text(
        f'[cache]\nservers = ["{memcached.address}"]\nkey_prefix = "{current_key_prefix()}"\n'
        'l1_ttl = 0.5\n'
        '[sources.double]\nkind = "python"\ntarget = "tests.sources_fixtures:double"\n'
        'executor = "thread"\nmax_age = 300\n', encoding="utf-8")
    server = gunicorn_factory(settings, workers=2)
    url = server.url + "/v1/double?x=21"
    status, headers, _ = http_get(url)
    assert status == 200 and headers["x-cache"] == "MISS"
    seen = {http_get(url)[1]["x-cache"] for _ in range(20)}
    assert seen == {"HIT"}

    env = {**os.environ, "SERVICE_SETTINGS": str(settings)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    flask = str(Path(sys.executable).with_name("flask"))
    cli = subprocess.run([flask, "--app", "wsgi", "swr", "invalidate", "double", "x=21"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == "invalidated entry double x=21: 1 entry listed"

    # The workers let go of their copies within l1_ttl (0.5 s): then the entry is loaded
    # again (without the invalidation it would be a HIT for max_age, 300 s).
    answers: list[str] = []
    deadline = time.monotonic() + 10.0
    while "MISS" not in answers and time.monotonic() < deadline:
        answers.append(http_get(url)[1]["x-cache"])
    assert "MISS" in answers and "STALE" not in answers, answers
    listed = subprocess.run([flask, "--app", "wsgi", "swr", "entries", "--json"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60, check=True)
    (row,) = json.loads(listed.stdout)["entries"]
    assert row["id"] == digest(row["key"]) and row["state"] == "fresh"


def test_a_quiet_command_leaves_the_process_logging_as_it_was(service: tuple[Flask, Flask]
                                                              ) -> None:
    import logging

    _worker, cli = service
    before = logging.getLogger("service").level
    ok(swr(cli, "entries"))
    assert logging.getLogger("service").level == before
