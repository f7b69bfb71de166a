"""The admin page in a real headless Chromium, against real gunicorn with two workers.

An operator logs in (the browser's Basic login, or a URL carrying the credentials), reads
the entries of the whole fleet, clicks "invalidate" on one row, confirms, and sees that
row change; the other rows stay. ``SWR_ADMIN_SCREENSHOTS=docs`` also writes the page's
screenshots there (that is how the README's picture was made).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser import Browser, Tab, browser  # noqa: F401  (the fixture)
from tests.servers import http_request

pytestmark = [pytest.mark.memcached, pytest.mark.gunicorn]
TOKEN = "browser-admin-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def settings_file(tmp_path: Path, memcached: Any, origin: Any) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(f"""
[cache]
servers = ["{memcached.address}"]
key_prefix = "browser{os.getpid()}x{time.monotonic_ns()}"
l1_ttl = 0.2

[sources.items]
kind = "http"
url = "{origin.url}/items?id={{id}}"
max_age = 300
stale_while_revalidate = 600
stale_if_error = 3600

[sources.fixed]
kind = "http"
url = "{origin.url}/fixed"
max_age = 30
stale_while_revalidate = 60
""")
    return path


@pytest.fixture
def fleet(tmp_path: Path, memcached: Any, origin_server: Any, gunicorn_factory: Any) -> Any:
    server = gunicorn_factory(settings_file(tmp_path, memcached, origin_server), workers=2,
                              env={"SERVICE_ADMIN_TOKEN": TOKEN})
    assert len(server.worker_pids()) == 2
    return server


def api(fleet: Any, path: str) -> dict[str, Any]:
    status, _headers, body = http_request("GET", fleet.url + path, headers=BEARER)
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def load_entries(fleet: Any) -> None:
    for i in (1, 2, 3, 1, 1, 2):
        http_request("GET", f"{fleet.url}/v1/items?id={i}")
    http_request("GET", f"{fleet.url}/v1/fixed")


def listing_from_each_worker(fleet: Any, count: int) -> dict[int, list[dict[str, Any]]]:
    """The entries as each of the two workers answers them, once both list ``count``."""
    answers: dict[int, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 30
    while len(answers) < 2 or any(len(rows) < count for rows in answers.values()):
        assert time.monotonic() < deadline, f"answers so far: {answers}"
        doc = api(fleet, "/admin/api/entries")
        answers[doc["answered_by"]["pid"]] = doc["entries"]
        time.sleep(0.02)
    return answers


def keep_screenshot(tab: Tab, tmp_path: Path, name: str) -> None:
    tab.screenshot(tmp_path / name)
    target = os.environ.get("SWR_ADMIN_SCREENSHOTS")
    if target:
        shutil.copy(tmp_path / name, Path(target) / name)


def rows_in_page(tab: Tab) -> Any:
    return tab.evaluate("""[...document.querySelectorAll('#entries tbody tr[data-id]')].map(
        (tr) => ({id: tr.dataset.id, state: tr.dataset.state}))""")


def test_operator_logs_in_reads_the_fleet_and_invalidates_one_entry(
        fleet: Any, browser: Browser, tmp_path: Path) -> None:  # noqa: F811
    load_entries(fleet)
    answers = listing_from_each_worker(fleet, 4)
    # Both workers answer the same list (the L1 column and the age aside).
    same = [[{k: v for k, v in r.items() if k not in ("tiers", "age")} for r in rows]
            for rows in answers.values()]
    assert same[0] == same[1] and len(same[0]) == 4
    rows = next(iter(answers.values()))
    target = next(r for r in rows if r["params"] == {"id": "2"})

    tab = browser.tab()
    tab.login_with("admin", TOKEN)               # the browser's Basic login dialog
    tab.open(fleet.url + "/admin/")
    tab.wait_for("document.body.dataset.loaded === 'yes' && "
                 "document.querySelectorAll('#entries tbody tr[data-id]').length === 4")
    assert {r["state"] for r in rows_in_page(tab)} == {"fresh"}
    overview = tab.evaluate("document.getElementById('overview').innerText")
    assert "hit ratio" in overview and "1 / 1" in overview          # memcached server up
    assert tab.evaluate("document.querySelectorAll('#charts svg').length") >= 6
    assert "items" in tab.evaluate("document.getElementById('sources').innerText")
    keep_screenshot(tab, tmp_path, "admin-page.png")

    tab.click(f'#entries tr[data-id="{target["id"]}"] button.danger')
    tab.wait_for(f"document.querySelector('#entries tr[data-id=\"{target['id']}\"]')"
                 f"?.dataset.state === 'invalidated'")
    assert len(tab.dialogs) == 1 and "Invalidate this entry of items ?id=2" in tab.dialogs[0]
    states = {r["id"]: r["state"] for r in rows_in_page(tab)}
    assert states.pop(target["id"]) == "invalidated"
    assert set(states.values()) == {"fresh"}                        # only that row changed
    assert "Invalidated one entry" in tab.evaluate("document.getElementById('status').innerText")
    keep_screenshot(tab, tmp_path, "admin-page-invalidated.png")

    for rows in listing_from_each_worker(fleet, 4).values():        # every worker agrees
        assert next(r for r in rows if r["id"] == target["id"])["state"] == "invalidated"
    time.sleep(0.25)                                                # l1_ttl
    _status, headers, _body = http_request("GET", f"{fleet.url}/v1/items?id=2")
    assert headers["x-cache"] == "MISS"
    assert not [line for line in tab.console if line.startswith("exception")]
    audit = [json.loads(line) for line in fleet.log_text().splitlines()
             if '"event":"admin"' in line]
    # The browser authenticates with its cached Basic login (or the page's cookie).
    assert [(a["action"], a["scope"]) for a in audit] == [("invalidate", "entry")]
    assert audit[0]["who"] in ("basic", "cookie") and audit[0]["key"] != target["key"]


def test_a_url_with_credentials_opens_a_working_page(fleet: Any,
                                                     browser: Browser) -> None:  # noqa: F811
    load_entries(fleet)
    listing_from_each_worker(fleet, 4)
    tab = browser.tab()
    host = fleet.url.removeprefix("http://")
    tab.open(f"http://admin:{TOKEN}@{host}/admin/")
    tab.wait_for("document.body.dataset.loaded === 'yes' && "
                 "document.querySelectorAll('#entries tbody tr[data-id]').length === 4")
    assert "loading" not in tab.evaluate("document.getElementById('overview').innerText")
    fixed = next(r for r in rows_in_page(tab)
                 if r["id"] and "fixed" in tab.evaluate(
                     f"document.querySelector('#entries tr[data-id=\"{r['id']}\"]').innerText"))
    tab.click(f'#entries tr[data-id="{fixed["id"]}"] button:not(.danger)')
    tab.wait_for("document.getElementById('status').innerText.startsWith('Refresh of fixed')")
    assert len(tab.dialogs) == 1 and "Refresh this entry of fixed" in tab.dialogs[0]
    assert not [line for line in tab.console if line.startswith("exception")]
