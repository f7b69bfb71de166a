"""``make run``, ``make stop`` and ``make clean`` (deploy/run-local.sh), run for real.

Each test copies the files those targets use into ``tmp_path`` and runs ``make -C`` there,
so ``make clean`` deletes only the copy's directories. The targets get free ports
(``MEMCACHED_ADDR``, ``GUNICORN_CMD_ARGS=--bind=...``), a ``RUNDIR`` under ``tmp_path`` (a
developer's ``.run`` is never touched) and the virtualenv these tests run in, which make is
told never to rebuild (``-o VENV/.installed``). ``make clean`` is given a throw-away
``VENV``.

Every process a test starts is stopped by the test, also when it fails: ``make stop`` first
(the path under test), then SIGKILL for whatever is left in the ``make run`` session and for
any process whose command line names the test's run directory (memcached daemonizes into a
session of its own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers import (
    REPO_ROOT,
    MemcachedFactory,
    MemcachedProcess,
    free_port,
    gunicorn_binary,
    http_get,
    log_tail,
    process_state,
    require_memcached,
)

pytestmark = [
    pytest.mark.memcached,
    pytest.mark.gunicorn,
    pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed"),
    pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed"),
    pytest.mark.skipif(sys.platform != "linux", reason="run-local.sh reads /proc"),
]

# The files `make run`/`stop`/`clean` use; the service package itself comes from the venv.
RUN_FILES = ("Makefile", "pyproject.toml", "wsgi.py", "deploy/run-local.sh",
             "deploy/gunicorn.conf.py")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 45.0     # run-local.sh gives gunicorn 40 s to drain, memcached 5 s


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def session_of(pid: int) -> int | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[3])


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def memcached_answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0) as sock:
            sock.sendall(b"version\r\n")
            return sock.recv(64).startswith(b"VERSION")
    except OSError:
        return False


class Project:
    """A copy of the run files, and `make` invoked on it with test-only paths and ports."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "project"
        for name in RUN_FILES:
            target = self.root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, target)
        self.rundir = tmp_path / "rundir"
        self.venv = Path(gunicorn_binary()).parent.parent
        self.http_port = free_port()
        self.memcached_addr = f"127.0.0.1:{free_port()}"
        self.run_log = tmp_path / "make-run.log"
        self.run_proc: subprocess.Popen[bytes] | None = None
        settings = tmp_path / "settings.toml"
        self.settings = settings
        self.set_memcached(self.memcached_addr)
        runtime = tmp_path / "xdg"
        runtime.mkdir(mode=0o700)
        env = {k: v for k, v in os.environ.items()
               if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PROMETHEUS_MULTIPROC_DIR")}
        env.update({
            "GUNICORN_CMD_ARGS": f"--bind=127.0.0.1:{self.http_port} --workers=1",
            "SERVICE_SETTINGS": str(settings),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
            "XDG_RUNTIME_DIR": str(runtime),
        })
        self.env = env

    def set_memcached(self, address: str) -> None:
        """Both where make starts (or finds) memcached and where the app looks for it."""
        self.memcached_addr = address
        self.settings.write_text(
            f'[cache]\nservers = ["{address}"]\nkey_prefix = "lifecycle"\n', encoding="utf-8")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def make_argv(self, target: str, venv: Path | None = None) -> list[str]:
        venv = venv or self.venv
        return ["make", "--no-print-directory", "-C", str(self.root),
                f"VENV={venv}", "-o", f"{venv}/.installed", f"RUNDIR={self.rundir}",
                f"MEMCACHED_ADDR={self.memcached_addr}", target]

    def make(self, target: str, venv: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.make_argv(target, venv), env=self.env, capture_output=True,
                              text=True, timeout=STOP_TIMEOUT + 15, check=False)

    # -- make run -------------------------------------------------------------------------------

    def start_run(self) -> subprocess.Popen[bytes]:
        """`make run` in its own session (as a terminal would run it), until /healthz is 200."""
        with open(self.run_log, "ab") as log:
            self.run_proc = subprocess.Popen(
                self.make_argv("run"), env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.run_proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"make run exited with {proc.returncode}:\n{log_tail(self.run_log)}")
            try:
                return http_get(self.url + "/healthz", timeout=2.0)[0] == 200
            except OSError:
                return False

        wait_until(healthy, READY_TIMEOUT, f"/healthz of make run\n{log_tail(self.run_log)}")
        return proc

    def run_output(self) -> str:
        return self.run_log.read_text(encoding="utf-8", errors="replace")

    def pid_from(self, name: str) -> int:
        path = self.rundir / name
        wait_until(path.exists, 5.0, str(path))
        return int(path.read_text().strip())

    def wait_run_exit(self) -> int:
        assert self.run_proc is not None
        return self.run_proc.wait(timeout=STOP_TIMEOUT)

    # -- teardown -------------------------------------------------------------------------------

    def kill_everything(self) -> None:
        """Whatever a failed test left: `make stop`, then SIGKILL for the rest."""
        proc = self.run_proc
        if (proc is not None and proc.poll() is None) or self.rundir.exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self.make("stop")
        ours = [pid for pid in all_pids() if pid != os.getpid() and (
            (proc is not None and session_of(pid) == proc.pid)
            or str(self.rundir) in cmdline(pid))]
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    require_memcached()     # make run starts one
    p = Project(tmp_path)
    try:
        yield p
    finally:
        p.kill_everything()


@pytest.fixture
def foreign_memcached(memcached_factory: MemcachedFactory) -> MemcachedProcess:
    """Somebody else's memcached: make must never stop it."""
    return memcached_factory()


def assert_ours(pid: int, program: str, project: Project) -> None:
    line = cmdline(pid)
    assert program in line and str(project.rundir) in line, line


# ------------------------------------------------------------------------------------------------


def test_make_stop_stops_what_make_run_started_and_nothing_else(
    project: Project, foreign_memcached: MemcachedProcess,
) -> None:
    project.start_run()
    gunicorn_pid = project.pid_from("gunicorn.pid")
    memcached_pid = project.pid_from("memcached.pid")
    assert_ours(gunicorn_pid, "gunicorn", project)
    assert_ours(memcached_pid, "memcached", project)
    assert memcached_answers(project.memcached_addr)
    assert f">>> starting memcached on {project.memcached_addr}" in project.run_output()

    second = project.make("run")
    assert second.returncode != 0
    assert f"a gunicorn started by make run is already running (pid {gunicorn_pid})" in (
        second.stdout)
    assert alive(gunicorn_pid) and alive(memcached_pid)

    stop = project.make("stop")

    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert f"stopping gunicorn (pid {gunicorn_pid})" in stop.stdout
    # make run's own clean-up may have stopped memcached a moment before make stop got there.
    assert (f"stopping memcached (pid {memcached_pid})" in stop.stdout
            or f"stopping memcached (pid {memcached_pid})" in project.run_output())
    assert project.wait_run_exit() == 0, project.run_output()
    assert not alive(gunicorn_pid) and not alive(memcached_pid)
    assert not (project.rundir / "gunicorn.pid").exists()
    assert not (project.rundir / "memcached.pid").exists()
    assert foreign_memcached.is_running() and memcached_answers(foreign_memcached.address)

    again = project.make("stop")
    assert again.returncode == 0 and "nothing to stop" in again.stdout, again.stdout


def test_ctrl_c_stops_gunicorn_and_the_memcached_make_run_started(project: Project) -> None:
    proc = project.start_run()
    gunicorn_pid = project.pid_from("gunicorn.pid")
    memcached_pid = project.pid_from("memcached.pid")

    os.killpg(proc.pid, signal.SIGINT)   # what the terminal does on Ctrl-C

    proc.wait(timeout=STOP_TIMEOUT)
    wait_until(lambda: not alive(memcached_pid), 10.0, "memcached to stop")
    assert not alive(gunicorn_pid)
    assert f"stopping memcached (pid {memcached_pid})" in project.run_output()
    assert not (project.rundir / "memcached.pid").exists()
    assert not memcached_answers(project.memcached_addr)


def test_make_run_says_it_reuses_a_foreign_memcached_and_make_stop_leaves_it(
    project: Project, foreign_memcached: MemcachedProcess,
) -> None:
    project.set_memcached(foreign_memcached.address)
    project.start_run()
    gunicorn_pid = project.pid_from("gunicorn.pid")

    assert (f">>> using the memcached already listening on {foreign_memcached.address} "
            "(not started by make run; make stop will leave it alone)") in project.run_output()
    assert not (project.rundir / "memcached.pid").exists()

    stop = project.make("stop")

    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "stopping gunicorn" in stop.stdout and "memcached" not in stop.stdout
    assert project.wait_run_exit() == 0
    assert not alive(gunicorn_pid)
    assert foreign_memcached.is_running() and memcached_answers(foreign_memcached.address)


def test_make_stop_never_signals_a_pid_that_is_not_ours(
    project: Project, foreign_memcached: MemcachedProcess, tmp_path: Path,
) -> None:
    # Nothing ran yet: no run directory at all.
    nothing = project.make("stop")
    assert nothing.returncode == 0, nothing.stdout + nothing.stderr
    assert "nothing to stop" in nothing.stdout
    assert not project.rundir.exists()

    # Pid files whose numbers were recycled: a memcached and a "gunicorn" that are not ours.
    decoy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "gunicorn", "--pid", "x"])
    try:
        project.rundir.mkdir()
        assert foreign_memcached.pid is not None
        (project.rundir / "memcached.pid").write_text(f"{foreign_memcached.pid}\n")
        (project.rundir / "gunicorn.pid").write_text(f"{decoy.pid}\n")

        stop = project.make("stop")

        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "nothing to stop" in stop.stdout
        assert f"pid {decoy.pid} is not the gunicorn make run started" in stop.stdout
        assert f"pid {foreign_memcached.pid} is not the memcached make run started" in stop.stdout
        assert decoy.poll() is None and foreign_memcached.is_running()
        assert not (project.rundir / "memcached.pid").exists()
        assert not (project.rundir / "gunicorn.pid").exists()
    finally:
        decoy.kill()
        decoy.wait()


def test_make_clean_stops_the_processes_before_deleting_their_pid_files(
    project: Project, tmp_path: Path,
) -> None:
    project.start_run()
    gunicorn_pid = project.pid_from("gunicorn.pid")
    memcached_pid = project.pid_from("memcached.pid")
    throwaway_venv = tmp_path / "throwaway-venv"
    throwaway_venv.mkdir()
    (project.root / ".ruff_cache").mkdir()

    clean = project.make("clean", venv=throwaway_venv)

    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.index("stopping gunicorn") < clean.stdout.index("rm -rf")
    assert project.wait_run_exit() == 0
    wait_until(lambda: not alive(memcached_pid), 10.0, "memcached to stop")
    assert not alive(gunicorn_pid)
    assert not project.rundir.exists() and not throwaway_venv.exists()
    assert not (project.root / ".ruff_cache").exists()
    assert (project.venv / "bin").is_dir()    # the real one is untouched


def test_a_daemonized_gunicorn_keeps_its_memcached_until_make_stop(project: Project) -> None:
    project.env["GUNICORN_CMD_ARGS"] += " --daemon"
    with open(project.run_log, "ab") as log:
        launcher = subprocess.run(project.make_argv("run"), env=project.env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=READY_TIMEOUT, check=False)
    assert launcher.returncode == 0, project.run_output()
    gunicorn_pid = project.pid_from("gunicorn.pid")
    memcached_pid = project.pid_from("memcached.pid")
    wait_until(lambda: http_get(project.url + "/healthz", timeout=2.0)[0] == 200
               if alive(gunicorn_pid) else False, READY_TIMEOUT, "the daemonized gunicorn")
    assert f"gunicorn detached (pid {gunicorn_pid})" in project.run_output()
    assert alive(memcached_pid) and memcached_answers(project.memcached_addr)

    stop = project.make("stop")

    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert f"stopping gunicorn (pid {gunicorn_pid})" in stop.stdout
    assert f"stopping memcached (pid {memcached_pid})" in stop.stdout
    assert not alive(gunicorn_pid) and not alive(memcached_pid)


def test_make_run_says_where_things_are_and_keeps_its_files_in_its_rundir(
        project: Project) -> None:
    project.env.pop("PROMETHEUS_MULTIPROC_DIR")   # the master's own directory, in .run/tmp
    project.env.pop("SERVICE_ADMIN_TOKEN", None)
    project.start_run()
    wait_until(lambda: "the CLI:" in project.run_output(), READY_TIMEOUT, "the banner")
    out = project.run_output()
    assert f"curl -i {project.url}/v1/primes" in out
    assert f"SERVICE_ADMIN_TOKEN=$(openssl rand -hex 16) make run   then open {project.url}" \
           "/admin/" in out
    assert "flask --app wsgi swr stats" in out
    status, _, body = http_get(project.url + "/admin/")
    assert status == 404 and b"set SERVICE_ADMIN_TOKEN" in body
    gunicorn_pid = project.pid_from("gunicorn.pid")
    assert (project.rundir / "tmp" / f"swr-cache-metrics-{gunicorn_pid}").is_dir()

    assert project.make("stop").returncode == 0
    assert project.wait_run_exit() == 0, project.run_output()
    assert list((project.rundir / "tmp").iterdir()) == []
