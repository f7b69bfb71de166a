"""A real headless Chromium for the admin page's tests, driven over the DevTools protocol.

Debian's ``chromium`` (installed by ``make test`` when root) is started with a throw-away
profile and ``--remote-debugging-port=0``; it writes the port it chose to
``DevToolsActivePort`` in the profile, and we speak CDP over one WebSocket
(``websocket-client``), one flat session per tab. Nothing is downloaded: no bundled browser,
no driver binary.

What a test can do with a :class:`Tab`: open a URL, answer the HTTP Basic login the way a
user answers the browser's dialog (:meth:`Tab.login_with`), evaluate JavaScript, wait for a
condition, click an element with real mouse events, accept ``confirm()`` dialogs (each one
is recorded), and take a screenshot. Every tab lives in a browser context of its own, so
two tabs share no cookies and no HTTP authentication cache.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1440,1000",
         "--remote-debugging-port=0", "--remote-allow-origins=*")
START_TIMEOUT = 30.0


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """The chromium binary; fails the test on CI when it is missing, skips it elsewhere."""
    binary = chromium_binary()
    if binary is not None:
        return binary
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed, and CI must have it: `make test` installs it")
    pytest.skip("chromium is not installed; install it with `apt-get install chromium` "
                "(make test does this when run as root)")


class CDPError(RuntimeError):
    pass


class Browser:
    """One Chromium process and its DevTools connection."""

    def __init__(self, binary: str, log_dir: Path) -> None:
        import websocket  # the test extra; imported here so collection never needs it

        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=log_dir))
        self.log_path = log_dir / "chromium.log"
        # Chromium leaves org.chromium.Chromium.* folders in the temp directory: give it a
        # temp directory of its own, which close() removes (short: its singleton socket's
        # path must fit a unix socket address).
        self.temp = Path(tempfile.mkdtemp(prefix="swr-chromium-"))
        temp = self.temp
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "TMPDIR": str(temp)})
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start; see {self.log_path}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=30,
                                              suppress_origin=True)
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {}

    # -- the protocol ---------------------------------------------------------------------

    def post(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> int:
        """Send a command without waiting for its answer; its id."""
        message: dict[str, Any] = {"id": next(self._ids), "method": method,
                                   "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        return int(message["id"])

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send a command and wait for its answer, handling events meanwhile."""
        wanted = self.post(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline, f"{method}")
            if message.get("id") == wanted:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from chromium for {waiting_for}")
        message: dict[str, Any] = json.loads(self.ws.recv())
        if "method" in message:
            handler = self._handlers.get(f"{message.get('sessionId')}:{message['method']}")
            if handler is not None:
                handler(message["params"])
            else:
                self._events.append(message)
        return message

    def on(self, session: str, method: str, handler: Callable[[dict[str, Any]], None]) -> None:
        self._handlers[f"{session}:{method}"] = handler

    def wait_event(self, session: str, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self._events):
                if event.get("sessionId") == session and event["method"] == method:
                    del self._events[i]
                    params: dict[str, Any] = event["params"]
                    return params
            self._receive(deadline, method)

    def tab(self) -> Tab:
        """A new tab in a browser context of its own (own cookies, own auth cache)."""
        context = self.send("Target.createBrowserContext")["browserContextId"]
        target = self.send("Target.createTarget", {"url": "about:blank",
                                                   "browserContextId": context})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
        return Tab(self, session)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
        shutil.rmtree(self.temp, ignore_errors=True)


class Tab:
    """One page (see the module docstring)."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session
        self.dialogs: list[str] = []
        self.console: list[str] = []
        self.send("Page.enable")
        self.send("Runtime.enable")
        browser.on(session, "Page.javascriptDialogOpening", self._accept_dialog)
        browser.on(session, "Runtime.consoleAPICalled", self._console)
        browser.on(session, "Runtime.exceptionThrown", self._exception)

    def send(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        return self.browser.send(method, params, self.session, timeout)

    def _accept_dialog(self, params: dict[str, Any]) -> None:
        # confirm() blocks the page (and the command that clicked) until it is answered:
        # answer at once, without waiting, like a user clicking OK.
        self.dialogs.append(params["message"])
        self.browser.post("Page.handleJavaScriptDialog", {"accept": True}, self.session)

    def _console(self, params: dict[str, Any]) -> None:
        self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                     for a in params.get("args", [])))

    def _exception(self, params: dict[str, Any]) -> None:
        details = params.get("exceptionDetails", {})
        self.console.append(f"exception: {details.get('exception', {}).get('description')}")

    def login_with(self, username: str, password: str) -> None:
        """Answer HTTP authentication challenges as a user answers the login dialog."""
        self.send("Fetch.enable", {"handleAuthRequests": True,
                                   "patterns": [{"urlPattern": "*"}]})

        def proceed(params: dict[str, Any]) -> None:
            self.browser.post("Fetch.continueRequest", {"requestId": params["requestId"]},
                              self.session)

        def answer(params: dict[str, Any]) -> None:
            self.browser.post("Fetch.continueWithAuth", {
                "requestId": params["requestId"],
                "authChallengeResponse": {"response": "ProvideCredentials",
                                          "username": username, "password": password}},
                self.session)

        self.browser.on(self.session, "Fetch.requestPaused", proceed)
        self.browser.on(self.session, "Fetch.authRequired", answer)

    def open(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        self.browser.wait_event(self.session, "Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Evaluate ``expression`` until it is truthy; its value. An expression that throws
        counts as not yet: right after a click or a reload the page may be between two
        documents (``document.body`` is null there)."""
        deadline = time.monotonic() + timeout
        thrown: CDPError | None = None
        while True:
            try:
                value = self.evaluate(expression)
            except CDPError as exc:
                value, thrown = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout}s: {expression}\n"
                                   f"last exception: {thrown}\nconsole: {self.console}")
            time.sleep(0.1)

    def click(self, selector: str) -> None:
        """A real click (mouse pressed and released) in the middle of the element."""
        box = self.evaluate(f"""(() => {{
            const node = document.querySelector({json.dumps(selector)});
            if (!node) return null;
            node.scrollIntoView({{block: 'center'}});
            const r = node.getBoundingClientRect();
            return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
        }})()""")
        if box is None:
            raise CDPError(f"nothing matches {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"],
                                                   "button": "left", "clickCount": 1})

    def screenshot(self, path: Path) -> None:
        """The whole page, as a PNG."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        data = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                     "scale": 1}})["data"]
        path.write_bytes(base64.b64decode(data))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A headless Chromium, stopped (and its profile removed) at teardown."""
    chromium = Browser(require_chromium(), tmp_path)
    try:
        yield chromium
    finally:
        chromium.close()
