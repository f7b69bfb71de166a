"""Every code sample and console session of the documentation is checked here.

The convention (also in docs/CONTRIBUTING.md, "Docs samples are tested"), for README.md,
docs/*.md and deploy/README.md; the reading of the files is ``tests/docsamples.py``:

- ```` ```python ````: a complete app (it makes ``app = Flask(__name__)`` itself) is written
  to a module and started for real as the README says
  (``gunicorn -c python:service.gunicorn.conf MODULE:app``),
  against a memcached of its own (``127.0.0.1:11211`` in the sample is replaced by that server's
  address); each of its GET routes is requested twice and must answer 200, and an
  ``@swr.cached`` view must answer ``X-Cache: MISS`` then ``HIT``. A fragment is compiled,
  every module and name it imports must exist, every ``"service.…"`` path it names must
  resolve, and it may use no name it does not define but ``app``.
- ```` ```console ````: a session. Lines beginning with ``$ `` are commands, the lines after
  one are what it prints. ``curl`` and ``flask`` commands are run, in order, against the
  shipped service (``wsgi:app`` under gunicorn with ``deploy/gunicorn.conf.py`` and the
  shipped ``settings.toml``, its ``[cache] servers`` pointed at a memcached of its own, one
  service per document; the admin is off, as under a bare ``make run``, unless a command
  of the document's sessions says ``$SERVICE_ADMIN_TOKEN``: then the service and the
  commands get ``SERVICE_ADMIN_TOKEN=ADMIN_TOKEN``): ``localhost:8000``
  in a command becomes the service's address, and the memcached's address in the output
  becomes ``127.0.0.1:11211``. The output is compared with tolerance: ``...`` on its own
  line matches any lines, ``...`` inside a line any text, an HTTP answer's header lines
  are a set, ``Age``/``Cache-Status``'s ``ttl``/dates may differ by the time the replay
  took, and an ``ETag`` stands for the server's value (the same one wherever the sample
  repeats it). Any other command fails the sample: move it to a ```` ```sh ```` block.
- ```` ```toml ````: parsed and validated by ``service.config.parse_settings``.
- ```` ```json ````: parsed.
- ```` ```sh ````/```` ```bash ````: ``bash -n``; every ``make TARGET`` must be a target of the
  Makefile, and is not run (``MAKE_NOT_RUN`` says why for each); every ``flask … swr …``
  line is run against the document's service and must exit 0.
- Any other fence (``text``, ``nginx``, ``promql``, none) is text, not checked.
- A sample is opted out only by the line right before its fence:
  ``<!-- doc-test: skip — the reason -->``; the reason is the test's skip message, and the
  module's summary line counts the skipped ones.

Relative links must reach a file and a heading that exist, a path of the repository named
in backquotes (`` `service/flask/fastpath.py` ``, `` `tests/x.py::test_y` ``) must exist, and
no document may cite one outside the repository (a specification's sections, issue numbers).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import pytest

from service.config import load_settings, parse_settings
from tests import docsamples
from tests.docsamples import Bindings, Sample
from tests.servers import REPO_ROOT, http_get
from tests.servers.gunicorn import GunicornProcess, gunicorn_binary
from tests.servers.memcached import MemcachedProcess, require_memcached

pytestmark = [pytest.mark.memcached, pytest.mark.gunicorn]

SAMPLES = docsamples.all_samples()
DOCS = docsamples.doc_files()
ADMIN_TOKEN = "doc-test-token"
DOCUMENTED_SERVICE = re.compile(r"\b(?:localhost|127\.0\.0\.1):8000\b")
DOCUMENTED_MEMCACHED = "127.0.0.1:11211"
RUNS = ("curl", "flask")   # the console commands that are run
COMMAND_TIMEOUT = 20.0

# make targets named in sh blocks, and why the docs test does not run them.
MAKE_NOT_RUN = {
    "run": "serves on port 8000 in the foreground: the console sessions run the same "
           "gunicorn config and app on a free port instead",
    "stop": "stops what `make run` started (tests/integration/test_lifecycle.py runs both)",
    "test": "is the whole suite, this test included",
    "lint": "is the suite's lint step (`make test` runs it)",
    "bench": "takes minutes of load on every core",
    "venv": "builds the virtualenv this test runs in",
    "clean": "deletes the virtualenv this test runs in",
}
# Citations of documents a reader cannot open.
OUTSIDE = re.compile(r"\bSPEC\b|§|\bissues? #?\d+|(?<![\w/])#\d{1,4}\b(?!-)")

COUNTS: Counter[str] = Counter({"samples skipped (doc-test: skip)": 0})


def by_lang(*langs: str) -> list[Sample]:
    return [s for s in SAMPLES if s.lang in langs]


def params(samples: list[Sample]) -> list[object]:
    return [pytest.param(s, id=s.id) for s in samples]


def skip_if_opted_out(sample: Sample) -> None:
    if sample.skip is not None:
        COUNTS["samples skipped (doc-test: skip)"] += 1
        pytest.skip(f"{sample.id}: {sample.skip}")


def require_curl() -> None:
    """The console sessions replay curl: fail on CI without it, skip elsewhere."""
    if shutil.which("curl") is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("curl is not installed, and CI must have it: run `make test`, which "
                    "installs it")
    pytest.skip("curl is not installed; install it with `apt-get install curl` (make test "
                "does this when run as root)")


# --------------------------------------------------------------------------------------------
# The servers: one memcached and one service per document with sessions, one memcached and one
# gunicorn per app sample; all started at once, all stopped at the end of the module.
# --------------------------------------------------------------------------------------------


class SampleAppProcess(GunicornProcess):
    """An app sample's module served as the README tells a user to: ``gunicorn -c
    python:service.gunicorn.conf MODULE:app``, the importable config, no ``SERVICE_SETTINGS``."""

    def command(self) -> list[str]:
        return [gunicorn_binary(), "-c", "python:service.gunicorn.conf",
                "--bind", f"{self.host}:{self.port}",
                "--workers", str(self.workers), self.app]

    def __init__(self, module_dir: Path, module: str, log_dir: Path) -> None:
        super().__init__(log_dir / "unused.toml", log_dir, workers=1, app=f"{module}:app")
        self.module_dir = module_dir

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.pop("SERVICE_SETTINGS", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.module_dir),
                                                          env.get("PYTHONPATH")]))
        return env

    def probe(self) -> tuple[bool, str]:
        """Ready when its worker answers HTTP at all: a sample app has no ``/healthz``."""
        try:
            status, _, _ = http_get(self.url + "/doc-test-probe", timeout=2.0)
        except OSError as exc:
            return False, repr(exc)
        return len(self.worker_pids()) >= self.workers, f"answered {status}"


@dataclass
class Service:
    """The shipped service for one document's sessions, and what its commands need."""

    gunicorn: GunicornProcess
    memcached: MemcachedProcess
    settings: Path
    token: dict[str, str]               # {"SERVICE_ADMIN_TOKEN": ...} or {}
    bindings: Bindings = field(default_factory=Bindings)
    started: float = 0.0

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if key not in ("SERVICE_ADMIN_TOKEN", "SERVICE_SETTINGS")}
        return {**env, "SERVICE_SETTINGS": str(self.settings), **self.token,
                "PATH": f"{REPO_ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        command = DOCUMENTED_SERVICE.sub(f"{self.gunicorn.host}:{self.gunicorn.port}",
                                         self.bindings.substitute(command))
        done = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        done.stdout = done.stdout.replace(self.memcached.address, DOCUMENTED_MEMCACHED)
        return done


@dataclass
class Servers:
    services: dict[str, Service]
    apps: dict[str, tuple[SampleAppProcess, MemcachedProcess]]
    # What did not start, by document or sample id: that one's test fails with it.
    failed: dict[str, BaseException]

    def check(self, key: str) -> None:
        if key in self.failed:
            pytest.fail(f"{key}: did not start: {self.failed[key]}", pytrace=False)


def shipped_settings(memcached: MemcachedProcess, prefix: str, path: Path) -> Path:
    """The shipped settings.toml with only the memcached address and key prefix replaced."""
    text = (REPO_ROOT / "settings.toml").read_text(encoding="utf-8")
    text, servers = re.subn(r"(?m)^servers = .*$", f'servers = ["{memcached.address}"]', text)
    text, prefixes = re.subn(r"(?m)^key_prefix = .*$", f'key_prefix = "{prefix}"', text)
    assert servers == prefixes == 1, "settings.toml: expected one servers and one key_prefix"
    path.write_text(text, encoding="utf-8")
    load_settings(path, fallback=False)
    return path


def app_module(sample: Sample, memcached: MemcachedProcess, directory: Path) -> str:
    name = "docsample_" + re.sub(r"\W", "_", sample.id)
    source = sample.text.replace(DOCUMENTED_MEMCACHED, memcached.address)
    source = source.replace("localhost:11211", memcached.address)
    (directory / f"{name}.py").write_text(source, encoding="utf-8")
    return name


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory,
            pytestconfig: pytest.Config) -> Iterator[Servers]:
    binary = require_memcached()
    root = tmp_path_factory.mktemp("docs")
    with contextlib.ExitStack() as stack:
        def memcached() -> MemcachedProcess:
            server = MemcachedProcess(binary, root)
            stack.callback(server.kill)
            return server

        masters: list[GunicornProcess] = []

        def stop_masters() -> None:
            # Side by side: each takes a second or two to drain and exit.
            gevent.joinall([gevent.spawn(m.stop) for m in masters if m.proc is not None])

        stack.callback(stop_masters)

        def gunicorn(server: GunicornProcess) -> GunicornProcess:
            masters.append(server)
            return server

        # Whatever a server leaves in its temporary directory stays in this test's.
        temp = {"TMPDIR": str(root)}
        services: dict[str, Service] = {}
        documents = sorted({s.path for s in SAMPLES
                            if s.skip is None and (s.lang == "console" or s.lang in ("sh", "bash")
                                                   and FLASK_SWR.search(s.text))})
        for number, document in enumerate(documents):
            mc = memcached()
            settings = root / f"settings-{number}.toml"
            token = {"SERVICE_ADMIN_TOKEN": ADMIN_TOKEN} if any(
                "$SERVICE_ADMIN_TOKEN" in step.command or "${SERVICE_ADMIN_TOKEN}" in step.command
                for s in by_lang("console") if s.path == document and s.skip is None
                for step in docsamples.console_steps(s)) else {}
            services[document] = Service(
                gunicorn(GunicornProcess(settings, root, workers=1, env={**token, **temp})),
                mc, settings,
                token)
        apps: dict[str, tuple[SampleAppProcess, MemcachedProcess]] = {}
        for sample in by_lang("python"):
            if sample.skip is None and docsamples.is_app(ast.parse(sample.text)):
                mc = memcached()
                app = SampleAppProcess(root, "", root)
                app.extra_env.update(temp)
                apps[sample.id] = (gunicorn(app), mc)

        def start_service(number: int, service: Service) -> None:
            service.memcached.start()
            shipped_settings(service.memcached, f"doc{number}", service.settings)
            service.gunicorn.start()

        def start_app(sample_id: str, server: SampleAppProcess, mc: MemcachedProcess) -> None:
            mc.start()
            sample = next(s for s in SAMPLES if s.id == sample_id)
            server.app = f"{app_module(sample, mc, root)}:app"
            server.start()

        jobs = {doc: gevent.spawn(start_service, n, s)
                for n, (doc, s) in enumerate(services.items())}
        jobs |= {i: gevent.spawn(start_app, i, *pair) for i, pair in apps.items()}
        gevent.joinall(list(jobs.values()))
        yield Servers(services, apps, {key: job.exception for key, job in jobs.items()
                                       if job.exception is not None})
    # The counts, past the output capture (which holds everything a fixture prints).
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\ndocs samples: " + ", ".join(
                f"{n} {what}" for what, n in sorted(COUNTS.items())))


# --------------------------------------------------------------------------------------------
# The convention itself: the extractor and the comparison, on known samples
# --------------------------------------------------------------------------------------------

KNOWN_WRONG = """HTTP/1.1 200 OK
X-Cache: HIT
Age: 3
Cache-Control: max-age=27, stale-while-revalidate=300, stale-if-error=3600
...
"""
SERVER_ANSWER = ("HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: Sun, 06 Dec 2026 07:32:49 GMT\r\n"
                 "X-Cache: HIT\r\nAge: 0\r\nETag: \"d2ff\"\r\n"
                 "Cache-Control: max-age=30, stale-while-revalidate=300, stale-if-error=3600\r\n"
                 "\r\n{\"count\":4}")


def test_the_known_wrong_sample_is_caught() -> None:
    problems = docsamples.match_output(KNOWN_WRONG.splitlines(), SERVER_ANSWER, Bindings(), 1.0)
    assert problems is not None
    assert "Age: the sample shows 3, the server answered 0" in problems
    assert "max-age=27" in problems


def test_headers_are_a_set_and_dots_match_anything() -> None:
    sample = ["HTTP/1.1 200 OK", "Age: 0", "Cache-Control: max-age=30, ...", "X-Cache: HIT",
              "...", "", '{"count":...}']
    assert docsamples.match_output(sample, SERVER_ANSWER, Bindings()) is None
    closed = [line for line in sample if line != "..."]
    problems = docsamples.match_output(closed, SERVER_ANSWER, Bindings())
    assert problems is not None and "not in the sample" in problems


def test_an_etag_stands_for_one_server_value() -> None:
    bindings = Bindings()
    assert bindings.bind_etag('"a"', '"x"') is None
    assert bindings.bind_etag('"a"', '"x"') is None
    assert bindings.bind_etag('"a"', '"y"') is not None       # the server's value changed
    assert bindings.bind_etag('"b"', '"x"') is not None       # two names for one value
    assert bindings.substitute("curl -H 'If-None-Match: \"a\"'") == "curl -H 'If-None-Match: \"x\"'"


def test_a_misspelt_opt_out_is_an_error(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- doc-test: skipped -->\n```python\npass\n```\n")
    with pytest.raises(docsamples.DocSampleError, match="convention"):
        docsamples.extract(doc, tmp_path)
    doc.write_text("<!-- doc-test: skip — needs a GPU -->\n```python\npass\n```\n")
    assert docsamples.extract(doc, tmp_path)[0].skip == "needs a GPU"


# --------------------------------------------------------------------------------------------
# The documents
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(REPO_ROOT)))
                                  for p in DOCS])
def test_links_reach_a_file_and_a_heading(path: Path) -> None:
    problems = docsamples.broken_links(path)
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(REPO_ROOT)))
                                  for p in DOCS])
def test_no_reference_outside_the_repository(path: Path) -> None:
    hits = [f"{n}: {line.strip()}" for n, line in
            enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, f"{path.name} cites what a reader cannot open:\n  " + "\n  ".join(hits)


DOCUMENTED_PATH = re.compile(
    r"`(?P<path>(?:service|tests|deploy|bench|examples|docs)/[\w./-]*\w)(?:::(?P<test>\w+))?")


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(REPO_ROOT)))
                                  for p in DOCS])
def test_every_path_named_exists(path: Path) -> None:
    missing = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for match in DOCUMENTED_PATH.finditer(line):
            named = REPO_ROOT / match["path"]
            if not named.exists():
                missing.append(f"{number}: {match['path']}")
            elif match["test"] and f"def {match['test']}(" not in named.read_text():
                missing.append(f"{number}: {match['path']}::{match['test']}")
    assert not missing, f"{path.name} names what is not there: " + "; ".join(missing)


def test_the_readme_starts_with_install_an_app_and_the_two_commands() -> None:
    readme = [s for s in SAMPLES if s.path == "README.md"]
    first_screen = [s for s in readme if s.line <= 50]
    assert "pip install" in first_screen[0].text
    name = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert f"pip install {name}" in first_screen[0].text
    app = next(s for s in first_screen if s.lang == "python")
    assert len(app.text.splitlines()) <= 20
    assert "swr.init_app" in app.text and "@swr.cached" in app.text
    assert any("make run" in s.text and "make test" in s.text for s in first_screen)


SAYS_IT_IS = re.compile(r"[Tt]his is\s+`(?P<file>[\w./-]+\.py)`")


@pytest.mark.parametrize("sample", params([s for s in SAMPLES if SAYS_IT_IS.search(s.before)]))
def test_a_sample_said_to_be_a_file_is_that_file(sample: Sample) -> None:
    name = SAYS_IT_IS.search(sample.before)["file"]  # type: ignore[index]
    source = (REPO_ROOT / name).read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(source), clean=False)
    if docstring is not None:
        source = source.split('"""', 2)[2].lstrip("\n")
    assert sample.text == source, f"{sample.id} is not {name} as it is now"


# --------------------------------------------------------------------------------------------
# The samples
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", params(by_lang("python")))
def test_python_sample(sample: Sample, servers: Servers) -> None:
    skip_if_opted_out(sample)
    tree = ast.parse(sample.text, sample.id)
    compile(tree, sample.id, "exec")
    if docsamples.is_app(tree):
        run_app(sample, tree, servers)
        return
    free = docsamples.free_names(tree) - docsamples.CONTEXT_NAMES
    assert not free, f"{sample.id}: uses {sorted(free)} without defining or importing them"
    for module, name in docsamples.imported(tree):
        imported = importlib.import_module(module)
        assert name is None or hasattr(imported, name) or \
            importlib.util.find_spec(f"{module}.{name}") is not None, \
            f"{sample.id}: `from {module} import {name}`: no such name"
    for path in docsamples.dotted_paths(tree):
        module, _, name = path.replace(":", ".").rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{sample.id}: {path}: no such name"
    COUNTS["python fragments compiled"] += 1


def run_app(sample: Sample, tree: ast.Module, servers: Servers) -> None:
    servers.check(sample.id)
    server, _ = servers.apps[sample.id]
    routes = docsamples.routes(tree)
    for route in routes:
        first = http_get(server.url + route.path)
        second = http_get(server.url + route.path)
        assert (first[0], second[0]) == (200, 200), \
            f"{sample.id}: GET {route.path} answered {first[0]}, {second[0]}: {first[2][:300]!r}"
        if route.swr_cached:
            assert (first[1].get("x-cache"), second[1].get("x-cache")) == ("MISS", "HIT"), \
                f"{sample.id}: GET {route.path}"
    COUNTS["python apps run"] += 1


@pytest.mark.parametrize("sample", params(by_lang("console")))
def test_console_session(sample: Sample, servers: Servers) -> None:
    skip_if_opted_out(sample)
    require_curl()
    servers.check(sample.path)
    service = servers.services[sample.path]
    if not service.started:
        service.started = time.monotonic()
    for step in docsamples.console_steps(sample):
        words = shlex.split(step.command)
        program = next((w for w in words if not re.match(r"^\w+=", w)), "")
        assert program in RUNS, (
            f"{sample.id} line {step.line}: `{step.command}`: a console session runs only "
            f"{', '.join(RUNS)}; move the command to a ```sh block")
        done = service.run(step.command)
        assert done.returncode == 0, f"{sample.id}: `{step.command}` exited {done.returncode}: " \
                                     f"{done.stderr[-500:]}"
        problems = docsamples.match_output(list(step.expected), done.stdout, service.bindings,
                                           time.monotonic() - service.started)
        assert problems is None, f"{sample.id} line {step.line}: `{step.command}`:\n{problems}"
        COUNTS["console commands compared"] += 1
    COUNTS["console sessions replayed"] += 1


@pytest.mark.parametrize("sample", params(by_lang("toml")))
def test_toml_sample(sample: Sample) -> None:
    skip_if_opted_out(sample)
    parse_settings(tomllib.loads(sample.text), sample.id)
    COUNTS["toml validated"] += 1


@pytest.mark.parametrize("sample", params(by_lang("json")))
def test_json_sample(sample: Sample) -> None:
    skip_if_opted_out(sample)
    json.loads(sample.text)
    COUNTS["json parsed"] += 1


# A command line (not a comment) that runs `flask … swr …` / `make TARGET`.
FLASK_SWR = re.compile(r"^(?!\s*#).*(?<![\w./-])flask\s.*\bswr\b.*$", re.M)
MAKE = re.compile(r"^(?!\s*#).*?(?<![\w./-])make\s+(?P<target>[a-z][\w-]*)", re.M)


@pytest.mark.parametrize("sample", params(by_lang("sh", "bash")))
def test_shell_sample(sample: Sample, servers: Servers) -> None:
    skip_if_opted_out(sample)
    checked = subprocess.run(["bash", "-n"], input=sample.text, capture_output=True, text=True)
    assert checked.returncode == 0, f"{sample.id}: {checked.stderr}"
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    for match in MAKE.finditer(sample.text):
        target = match["target"]
        assert re.search(rf"(?m)^{re.escape(target)}:", makefile), \
            f"{sample.id}: `make {target}`: no such target in the Makefile"
        assert target in MAKE_NOT_RUN, f"{sample.id}: `make {target}`: say in MAKE_NOT_RUN " \
                                       "why it is not run here, or run it"
        COUNTS["make commands not run (MAKE_NOT_RUN)"] += 1
    for match in FLASK_SWR.finditer(sample.text):
        command = match[0].split(" #")[0].strip()
        servers.check(sample.path)
        done = servers.services[sample.path].run(command)
        assert done.returncode == 0, f"{sample.id}: `{command}` exited {done.returncode}: " \
                                     f"{done.stderr[-500:]}"
        COUNTS["flask swr commands run"] += 1
    COUNTS["sh syntax-checked"] += 1
