"""The admin page in a real headless Chromium, against real gunicorn with two workers.

An operator logs in (the browser's Basic login, or a URL carrying the credentials), reads
the entries of the whole fleet, clicks "invalidate" on one row, confirms, and sees that
row change; the other rows stay; each row links to its entry's page, which a reload (or
a colleague) opens again; the charts have labelled time axes, the page an icon, and the
console no failed request. ``SWR_ADMIN_SCREENSHOTS=docs`` also writes the screenshots of
the shipped demo (settings.toml's ``primes``) there: that is how docs/admin-page.png and
docs/admin-page-invalidated.png are made::

    SWR_ADMIN_SCREENSHOTS=docs .venv/bin/python -m pytest -p no:cacheprovider \
        tests/integration/test_admin_browser.py -k shipped_demo
"""

from __future__ import annotations

import json
import os
import re
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
    """Only the shipped demo's screenshots are the documentation's."""
    tab.screenshot(tmp_path / name)
    target = os.environ.get("SWR_ADMIN_SCREENSHOTS")
    if target:
        shutil.copy(tmp_path / name, Path(target) / name)


def console_errors(tab: Tab) -> list[str]:
    """What the browser's console says from now on at level error: a failed request
    (``/favicon.ico``'s 404 among them) is one."""
    said: list[str] = []
    tab.send("Log.enable")
    tab.browser.on(tab.session, "Log.entryAdded", lambda params: said.append(
        f"{params['entry'].get('level')}: {params['entry'].get('text')} "
        f"{params['entry'].get('url', '')}"))
    return said


def check_axes_and_icon(tab: Tab) -> None:
    axes = tab.evaluate("""[...document.querySelectorAll('#charts .chart')].map((c) =>
        [...c.querySelectorAll('.xaxis span')].map((s) => s.innerText))""")
    assert len(axes) >= 6
    for ticks in axes:                      # the first minute, half an hour ago, now
        assert len(ticks) == 3 and all(re.fullmatch(r"\d\d:\d\d", t) for t in ticks), ticks
    assert all(tab.evaluate("""[...document.querySelectorAll('#charts .yaxis')].map(
        (y) => y.innerText.trim().endsWith('0'))"""))
    icon = tab.evaluate("document.querySelector('link[rel=icon]').href")
    assert icon.startswith("data:image/svg+xml;base64,")


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
    errors = console_errors(tab)
    tab.login_with("admin", TOKEN)               # the browser's Basic login dialog
    tab.open(fleet.url + "/admin/")
    tab.wait_for("document.body.dataset.loaded === 'yes' && "
                 "document.querySelectorAll('#entries tbody tr[data-id]').length === 4")
    assert {r["state"] for r in rows_in_page(tab)} == {"fresh"}
    overview = tab.evaluate("document.getElementById('overview').innerText")
    assert "hit ratio" in overview and "1 / 1" in overview          # memcached server up
    assert tab.evaluate("document.querySelectorAll('#charts svg').length") >= 6
    assert "items" in tab.evaluate("document.getElementById('sources').innerText")
    check_axes_and_icon(tab)
    tab.screenshot(tmp_path / "admin-page.png")

    tab.click(f'#entries tr[data-id="{target["id"]}"] button.danger')
    tab.wait_for(f"document.querySelector('#entries tr[data-id=\"{target['id']}\"]')"
                 f"?.dataset.state === 'invalidated'")
    assert len(tab.dialogs) == 1 and "Invalidate this entry of items ?id=2" in tab.dialogs[0]
    states = {r["id"]: r["state"] for r in rows_in_page(tab)}
    assert states.pop(target["id"]) == "invalidated"
    assert set(states.values()) == {"fresh"}                        # only that row changed
    assert "Invalidated one entry" in tab.evaluate("document.getElementById('status').innerText")
    tab.screenshot(tmp_path / "admin-page-invalidated.png")

    for rows in listing_from_each_worker(fleet, 4).values():        # every worker agrees
        assert next(r for r in rows if r["id"] == target["id"])["state"] == "invalidated"
    time.sleep(0.25)                                                # l1_ttl
    _status, headers, _body = http_request("GET", f"{fleet.url}/v1/items?id=2")
    assert headers["x-cache"] == "MISS"
    assert not [line for line in tab.console if line.startswith("exception")]
    assert not errors, errors                                       # no 404, no favicon.ico
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


def test_each_entry_has_a_page_that_a_reload_opens_again(fleet: Any,
                                                         browser: Browser) -> None:  # noqa: F811
    load_entries(fleet)
    rows = next(iter(listing_from_each_worker(fleet, 4).values()))
    target = next(r for r in rows if r["params"] == {"id": "3"})
    tab = browser.tab()
    errors = console_errors(tab)
    tab.login_with("admin", TOKEN)
    tab.open(fleet.url + "/admin/")
    tab.wait_for("document.body.dataset.loaded === 'yes'")
    link = f'#entries tr[data-id="{target["id"]}"] a.entry-link'
    assert tab.evaluate(f"document.querySelector({json.dumps(link)}).getAttribute('href')") \
        == f"{fleet.url}/admin/entries/{target['id']}"
    tab.click(link)
    url = f"{fleet.url}/admin/entries/{target['id']}"
    # (While the next page loads, it has no body yet.)
    tab.wait_for(f"location.href === {json.dumps(url)} && document.body?.dataset.loaded === 'yes'")
    for _ in range(2):                                  # as followed, then reloaded
        facts = tab.wait_for("document.body?.dataset.loaded === 'yes' && "
                             "document.getElementById('entry-facts').innerText")
        assert target["key"] in facts and target["id"] in facts and "fresh" in facts
        assert tab.evaluate("document.getElementById('fleet').hidden") is True
        assert tab.evaluate("document.title").startswith(f"entry {target['id'][:12]}")
        tab.open(url)
    tab.wait_for("document.body.dataset.loaded === 'yes'")
    tab.click("#entry-invalidate")
    tab.wait_for("document.getElementById('entry-facts').innerText.includes('invalidated')")
    assert len(tab.dialogs) == 1 and "Invalidate this entry of items ?id=3" in tab.dialogs[0]
    assert not [line for line in tab.console if line.startswith("exception")]
    assert not errors, errors


@pytest.fixture
def demo(tmp_path: Path, memcached: Any, gunicorn_factory: Any) -> Any:
    """The service as shipped: the repository's settings.toml (the ``primes`` demo), on
    the test's memcached."""
    text = (Path(__file__).resolve().parents[2] / "settings.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^servers = .*$", f'servers = ["{memcached.address}"]', text, count=1)
    text = re.sub(r"(?m)^key_prefix = .*$",
                  f'key_prefix = "demo{os.getpid()}x{time.monotonic_ns()}"', text, count=1)
    assert "service.http.demo:primes" in text and memcached.address in text
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    return gunicorn_factory(path, workers=2, env={"SERVICE_ADMIN_TOKEN": TOKEN})


def test_the_shipped_demo_as_the_documentation_shows_it(
        demo: Any, browser: Browser, tmp_path: Path) -> None:  # noqa: F811
    limits = ("1000", "100000", "2000000", "50")
    for limit in (*limits, "1000", "100000", "1000"):
        status, _headers, body = http_request("GET", f"{demo.url}/v1/primes?limit={limit}")
        assert status == 200, body
    rows = next(iter(listing_from_each_worker(demo, len(limits)).values()))
    assert {r["source"] for r in rows} == {"primes"}
    tab = browser.tab()
    errors = console_errors(tab)
    tab.login_with("admin", TOKEN)
    tab.open(demo.url + "/admin/")
    tab.wait_for("document.body.dataset.loaded === 'yes' && document.querySelectorAll("
                 f"'#entries tbody tr[data-id]').length === {len(limits)}")
    sources = tab.evaluate("document.getElementById('sources').innerText")
    assert "primes" in sources and "/v1 python" in sources and "≤" not in sources
    check_axes_and_icon(tab)
    keep_screenshot(tab, tmp_path, "admin-page.png")
    target = next(r for r in rows if r["params"] == {"limit": "100000"})
    tab.click(f'#entries tr[data-id="{target["id"]}"] button.danger')
    tab.wait_for(f"document.querySelector('#entries tr[data-id=\"{target['id']}\"]')"
                 f"?.dataset.state === 'invalidated'")
    keep_screenshot(tab, tmp_path, "admin-page-invalidated.png")
    assert not [line for line in tab.console if line.startswith("exception")]
    assert not errors, errors
