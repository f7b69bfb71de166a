"""The production deployment files in deploy/ (see deploy/README.md).

- ``systemd-analyze verify`` has nothing to say about the swr-cache unit or the memcached
  drop-in. Its exit status alone is not enough: an unknown key or an unparsable value is
  only a warning ("..., ignoring.") with exit status 0, so the output is checked too, and a
  deliberately broken copy proves that the check notices such lines.
- Every memcached flag of the drop-in is accepted by the installed memcached and means what
  its comment says (``stats settings``), and ``-I`` matches ``[cache] item_size_max``.
- The unit keeps its hardening options.
- The unit's command lines work with our gunicorn config the way systemd will use them:
  ExecStart (after systemd's ${VAR} expansion) sends READY=1 from the main PID (Type=notify,
  NotifyAccess=main), ExecReload replaces the workers, KillSignal stops it well within
  TimeoutStopSec.
"""

from __future__ import annotations

import ast
import contextlib
import os
import pwd
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from tests.servers import (
    REPO_ROOT,
    child_pids,
    free_port,
    http_get,
    log_tail,
    memcached_binary,
    require_memcached,
)

UNIT = REPO_ROOT / "deploy" / "swr-cache.service"
DROPIN = REPO_ROOT / "deploy" / "memcached.service.d" / "override.conf"
GUNICORN_CONF = REPO_ROOT / "deploy" / "gunicorn.conf.py"
SETTINGS = REPO_ROOT / "settings.toml"
# Debian's packaged memcached unit, which the drop-in modifies.
PACKAGED_MEMCACHED_UNITS = (
    Path("/lib/systemd/system/memcached.service"),
    Path("/usr/lib/systemd/system/memcached.service"),
)
MEMCACHED_START_TIMEOUT = 10.0
GUNICORN_READY_TIMEOUT = 30.0

# memcached's short options that take an argument (memcached 1.6 `memcached -h`).
MEMCACHED_OPTS_WITH_ARG = frozenset(
    "-p -U -s -a -l -u -m -c -P -f -n -D -t -R -b -B -I -Y -e -o".split()
)


# --------------------------------------------------------------------------------------------
# Reading unit files the way systemd does (the parts these files use)
# --------------------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file: {section: [(key, value), ...]} in file order.

    Comment lines are dropped, also between continuation lines; a trailing backslash joins
    a line with the next one, the backslash becoming a space (systemd.syntax(7)).
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(("#", ";")):
            continue
        if pending is not None:
            line = pending + " " + line
            pending = None
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """The values of a list-like setting; an empty assignment resets the list, as in systemd."""
    out: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            out = [] if v == "" else [*out, v]
    return out


def last(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    """The effective value of a single-valued setting (the last assignment wins)."""
    found = [v for k, v in unit.get(section, []) if k == key]
    return found[-1] if found else None


def environment(unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """The variables set by Environment= lines."""
    env: dict[str, str] = {}
    for line in values(unit, "Service", "Environment"):
        for word in shlex.split(line):
            name, sep, value = word.partition("=")
            assert sep, f"Environment= word without '=': {word!r}"
            env[name] = value
    return env


def expand_command(command: str, env: dict[str, str]) -> list[str]:
    """systemd's expansion of an Exec*= command line: ``${VAR}`` inside a word becomes the
    exact value, a word ``$VAR`` becomes the value split at whitespace."""
    argv: list[str] = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv.extend(env.get(whole.group(1), "").split())
            continue
        argv.append(
            re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word)
        )
    return argv


def is_true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "yes", "true", "on")


def seconds(value: str) -> float:
    """A systemd time span such as "40", "40s", "1min 30s"."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def graceful_timeout() -> float:
    """``graceful_timeout`` of deploy/gunicorn.conf.py, read without executing the file."""
    tree = ast.parse(GUNICORN_CONF.read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "graceful_timeout" for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            return float(node.value.value)
    raise AssertionError(f"no literal graceful_timeout in {GUNICORN_CONF}")


def memcached_flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """memcached's command line as (flag, argument or None) pairs."""
    flags: list[tuple[str, str | None]] = []
    args = iter(argv)
    for arg in args:
        assert arg.startswith("-") and not arg.startswith("--"), (
            f"expected short memcached options only, got {arg!r} in {argv}"
        )
        if arg[:2] in MEMCACHED_OPTS_WITH_ARG:
            flags.append((arg[:2], arg[2:] or next(args)))
        else:
            flags.append((arg, None))
    return flags


def size_bytes(value: str) -> int:
    """memcached's -I syntax: bytes, or a number with k or m."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", value)
    assert m, f"unexpected -I value {value!r}"
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dropin_argv() -> list[str]:
    dropin = parse_unit(DROPIN.read_text(encoding="utf-8"))
    commands = values(dropin, "Service", "ExecStart")
    assert len(commands) == 1, (
        f"the drop-in must reset ExecStart= and set exactly one command, got {commands}"
    )
    return shlex.split(commands[0])


# --------------------------------------------------------------------------------------------
# (a) systemd-analyze verify
# --------------------------------------------------------------------------------------------


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip(
            "systemd-analyze is not installed, so the unit files cannot be verified here; "
            "it is in Debian's `systemd` package (apt-get install systemd)"
        )
    return found


def run_verify(args: list[str], env_extra: dict[str, str] | None = None) -> tuple[int, str]:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C",
           **(env_extra or {})}
    done = subprocess.run(
        [systemd_analyze(), "verify", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    output = done.stdout + done.stderr
    if "sysinit.target not found" in output:
        pytest.skip(f"systemd's own units are not installed here, verify cannot run:\n{output}")
    return done.returncode, output


def about(output: str, *names: str) -> list[str]:
    """The lines of verify's output about our files: systemd prefixes every diagnostic with
    the unit name ("x.service: ...") or the file ("/path/x.service:12: ...")."""
    return [line for line in output.splitlines() if any(n in line for n in names)]


def unit_for_this_machine(tmp_path: Path, text: str | None = None) -> Path:
    """A copy of the unit whose VENV and WorkingDirectory exist here (this test's venv and
    checkout), so that the paths verify and the ExecStart check look at are real."""
    text = UNIT.read_text(encoding="utf-8") if text is None else text
    text, n_venv = re.subn(
        r"^Environment=VENV=.*$", f"Environment=VENV={sys.prefix}", text, flags=re.M
    )
    text, n_wd = re.subn(
        r"^WorkingDirectory=.*$", f"WorkingDirectory={REPO_ROOT}", text, flags=re.M
    )
    assert (n_venv, n_wd) == (1, 1), "the unit must set Environment=VENV= and WorkingDirectory="
    path = tmp_path / UNIT.name
    path.write_text(text, encoding="utf-8")
    return path


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    path = unit_for_this_machine(tmp_path)
    rc, output = run_verify([str(path)])
    complaints = about(output, UNIT.name)
    assert rc == 0 and not complaints, (
        f"systemd-analyze verify {path} exited {rc}:\n{output}"
    )
    # verify checks that the program of ExecStart= exists; ours is /usr/bin/env (systemd does
    # not expand variables in the program), so check what env will exec() as well.
    unit = parse_unit(path.read_text(encoding="utf-8"))
    (command,) = values(unit, "Service", "ExecStart")
    argv = expand_command(command, environment(unit))
    assert argv[0] == "/usr/bin/env" and os.access(argv[0], os.X_OK), argv
    assert os.access(argv[1], os.X_OK), f"{argv[1]} (ExecStart after expansion) is missing"


def test_verify_check_notices_bad_lines(tmp_path: Path) -> None:
    """The check above is not vacuous: with this systemd an unknown key and a bad value give
    exit status 0, and only the output tells."""
    broken = UNIT.read_text(encoding="utf-8").replace(
        "[Service]\n", "[Service]\nProtectHomee=yes\nProtectSystem=strictest\n", 1
    )
    path = unit_for_this_machine(tmp_path, broken)
    _, output = run_verify([str(path)])
    complaints = "\n".join(about(output, UNIT.name))
    assert "ProtectHomee" in complaints, output
    assert "strictest" in complaints, output


def test_memcached_dropin_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    systemd_analyze()
    # The drop-in names Debian's path; verify checks that the program exists.
    if not os.access("/usr/bin/memcached", os.X_OK):
        if memcached_binary() is None:
            require_memcached()  # skips, or fails on CI
        pytest.skip("the drop-in runs /usr/bin/memcached (Debian's path); memcached is "
                    f"installed at {memcached_binary()} here")
    units = tmp_path / "units"
    (units / "memcached.service.d").mkdir(parents=True)
    packaged = next((p for p in PACKAGED_MEMCACHED_UNITS if p.is_file()), None)
    if packaged is not None:
        shutil.copy(packaged, units / "memcached.service")
    else:  # memcached not from Debian's package: a stand-in for the unit the drop-in edits
        (units / "memcached.service").write_text(
            "[Unit]\nDescription=stand-in for Debian's memcached.service\n"
            "[Service]\nExecStart=/usr/bin/memcached -u memcache\n"
            "[Install]\nWantedBy=multi-user.target\n",
            encoding="utf-8",
        )
    shutil.copy(DROPIN, units / "memcached.service.d" / "override.conf")
    # The trailing ":" appends systemd's own unit directories (for the targets); ours come
    # first. Drop-ins installed on this machine under /etc would be merged as well.
    rc, output = run_verify(["memcached.service"], {"SYSTEMD_UNIT_PATH": f"{units}:"})
    complaints = [
        line for line in about(output, "memcached.service", "override.conf")
        # Lines about the packaged unit's own text are Debian's business, not ours.
        if str(units / "memcached.service:") not in line
    ]
    assert rc == 0 and not complaints, (
        f"systemd-analyze verify memcached.service (with the drop-in) exited {rc}:\n{output}"
    )


# --------------------------------------------------------------------------------------------
# (b) the memcached flags, against the installed memcached
# --------------------------------------------------------------------------------------------


def test_dropin_has_the_safe_flags(dropin_argv: list[str]) -> None:
    assert dropin_argv[0] == "/usr/bin/memcached", dropin_argv
    flags = dict(memcached_flags(dropin_argv[1:]))
    assert flags.get("-U") == "0", "UDP must be off (-U 0)"
    assert "-d" not in flags, "memcached must stay in the foreground under systemd (no -d)"
    for flag in ("-u", "-l", "-p", "-m", "-I", "-c", "-t"):
        assert flag in flags, f"{flag} missing from the drop-in's ExecStart"
    listen = flags["-l"] or ""
    assert "0.0.0.0" not in listen and "::" not in listen.split(","), (
        "memcached must not listen on every interface: it has no authentication"
    )


def test_dropin_item_size_matches_settings(dropin_argv: list[str]) -> None:
    flags = dict(memcached_flags(dropin_argv[1:]))
    with SETTINGS.open("rb") as f:
        item_size_max = tomllib.load(f)["cache"].get("item_size_max", 1024 * 1024)
    assert size_bytes(flags["-I"] or "") == item_size_max, (
        f"memcached -I {flags['-I']} and [cache] item_size_max = {item_size_max} in "
        f"{SETTINGS.name} must agree"
    )


def _memcached_command(
    binary: str, argv: list[str]
) -> tuple[list[str], list[str], dict[str, str | None]]:
    """The drop-in's command adapted to this machine: listen addresses mapped onto loopback,
    a free port, a user that exists. Returns (command, addresses, effective flags)."""
    command = [binary]
    hosts: list[str] = []
    effective: dict[str, str | None] = {}
    spare = iter(f"127.0.0.{n}" for n in range(2, 255))
    port = free_port()
    for flag, arg in memcached_flags(argv[1:]):
        if flag == "-l":
            assert arg is not None
            for address in arg.split(","):
                loopback = address.startswith("127.") or address in ("::1", "localhost")
                # 127.0.0.0/8 is all local on Linux: a private address becomes another
                # loopback address, so the comma-separated list itself is exercised too.
                hosts.append(address if loopback else next(spare))
            arg = ",".join(hosts)
        elif flag == "-p":
            arg = str(port)
        elif flag == "-u" and os.geteuid() == 0:
            try:
                pwd.getpwnam(arg or "")
            except KeyError:
                arg = pwd.getpwuid(0).pw_name  # no such user here (memcached not from Debian)
        elif flag == "-c" and os.geteuid() != 0:
            # Unprivileged, memcached can only lower its open-files limit to -c.
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            if hard != resource.RLIM_INFINITY and int(arg or 0) > hard:
                arg = str(hard)
        command += [flag] if arg is None else [flag, arg]
        effective[flag] = arg
    if os.geteuid() == 0 and "-u" not in effective:
        command += ["-u", pwd.getpwuid(0).pw_name]
    return command, [f"{h}:{port}" for h in hosts], effective


def _ask(address: str, command: bytes, until: bytes, timeout: float = 2.0) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(command)
        data = b""
        while not data.endswith(until):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.memcached
def test_memcached_accepts_every_dropin_flag(dropin_argv: list[str], tmp_path: Path) -> None:
    binary = require_memcached()
    command, addresses, flags = _memcached_command(binary, dropin_argv)
    log_path = tmp_path / "memcached.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + MEMCACHED_START_TIMEOUT
        waiting = list(addresses)
        while waiting:
            assert proc.poll() is None, (
                f"memcached exited with {proc.returncode} on {command}:\n{log_tail(log_path)}"
            )
            try:
                assert _ask(waiting[0], b"version\r\n", b"\r\n").startswith(b"VERSION ")
                waiting.pop(0)
            except OSError:
                assert time.monotonic() < deadline, (
                    f"memcached ({command}) does not answer on {waiting[0]}:\n"
                    f"{log_tail(log_path)}"
                )
                time.sleep(0.05)

        raw = _ask(addresses[0], b"stats settings\r\n", b"END\r\n").decode()
        stats = dict(line.split(" ", 2)[1:] for line in raw.splitlines() if line.startswith("STAT"))
        assert stats["udpport"] == "0"
        assert stats["inter"] == flags["-l"]
        assert int(stats["maxbytes"]) == int(flags["-m"] or 0) * 1024 * 1024
        assert int(stats["item_size_max"]) == size_bytes(flags["-I"] or "")
        assert int(stats["maxconns"]) == int(flags["-c"] or 0)
        assert int(stats["num_threads"]) == int(flags["-t"] or 0)
        if "-F" in flags:
            assert stats["flush_enabled"] == "no"
            assert _ask(addresses[0], b"flush_all\r\n", b"\r\n").startswith(b"CLIENT_ERROR")
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# (c) hardening
# --------------------------------------------------------------------------------------------

HARDENING_ON = (
    "NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectControlGroups", "RestrictNamespaces", "LockPersonality",
    "MemoryDenyWriteExecute",
)


@pytest.mark.parametrize("option", HARDENING_ON)
def test_unit_hardening_switch_is_on(unit: dict[str, list[tuple[str, str]]], option: str) -> None:
    assert is_true(last(unit, "Service", option)), f"{option}=yes missing from {UNIT.name}"


def test_unit_hardening_values(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert last(unit, "Service", "ProtectSystem") == "strict"
    assert last(unit, "Service", "SystemCallArchitectures") == "native"
    families = " ".join(values(unit, "Service", "RestrictAddressFamilies")).split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    # Present and empty: no capabilities at all.
    assert last(unit, "Service", "CapabilityBoundingSet") == ""
    # Runs as a dedicated account, never root.
    user = last(unit, "Service", "User")
    assert is_true(last(unit, "Service", "DynamicUser")) or user not in (None, "", "root", "0")
    # The only writable places are the service's own (ProtectSystem=strict does the rest).
    own = ("/run/swr-cache", "/var/lib/swr-cache", "/var/cache/swr-cache", "/var/log/swr-cache")
    for path in " ".join(values(unit, "Service", "ReadWritePaths")).split():
        assert path.lstrip("-").startswith(own), f"ReadWritePaths={path} opens a shared path"


def test_unit_process_management(unit: dict[str, list[tuple[str, str]]]) -> None:
    env = environment(unit)
    (command,) = values(unit, "Service", "ExecStart")
    program = shlex.split(command)[0]
    # systemd does not substitute variables in the program itself (systemd.service(5)).
    assert program.startswith("/") and "$" not in program, command
    assert "${VENV}/bin/gunicorn -c deploy/gunicorn.conf.py wsgi:app" in command
    assert env.get("VENV"), "Environment=VENV=... missing"
    assert values(unit, "Service", "EnvironmentFile") == ["-/etc/swr-cache/env"]
    assert last(unit, "Service", "WorkingDirectory")
    reload_lines = values(unit, "Service", "ExecReload")
    assert reload_lines and reload_lines[-1] == "/bin/kill -s HUP $MAINPID", reload_lines
    assert last(unit, "Service", "KillSignal") == "SIGTERM"
    assert last(unit, "Service", "Restart") == "on-failure"
    stop = seconds(last(unit, "Service", "TimeoutStopSec") or "")
    assert graceful_timeout() < stop <= graceful_timeout() + 30, (
        f"TimeoutStopSec={stop:g} should be a little above gunicorn's graceful_timeout"
    )
    assert "swr-cache" in (last(unit, "Service", "RuntimeDirectory") or "").split()
    assert env.get("PROMETHEUS_MULTIPROC_DIR") == "/run/swr-cache/metrics"


# --------------------------------------------------------------------------------------------
# (d) the unit's command lines, run the way systemd runs them (without the sandbox)
# --------------------------------------------------------------------------------------------


def _notifications(sock: socket.socket, deadline: float) -> tuple[int, str]:
    """The next sd_notify datagram: (sender pid, text)."""
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    pid = -1
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
    return pid, data.decode(errors="replace")


def reload(unit: dict[str, list[tuple[str, str]]], env: dict[str, str], main_pid: int) -> int:
    """Run the ExecReload= lines in order, as systemd does: stop at the first that fails.
    Returns the exit status of the last one run."""
    code = 0
    for line in values(unit, "Service", "ExecReload"):
        argv = expand_command(line, {**env, "MAINPID": str(main_pid)})
        code = subprocess.run(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60, check=False).returncode
        if code != 0:
            break
    return code


def _wait_http_ok(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"gunicorn exited with {proc.returncode}:\n{log_tail(log)}"
        with contextlib.suppress(OSError):
            if http_get(url, timeout=2.0)[0] == 200:
                return
        assert time.monotonic() < deadline, f"{url} not answering:\n{log_tail(log)}"
        time.sleep(0.1)


@pytest.mark.gunicorn
def test_unit_commands_start_reload_and_stop_gunicorn(
    unit: dict[str, list[tuple[str, str]]], tmp_path: Path
) -> None:
    assert last(unit, "Service", "Type") == "notify"
    # What systemd would set up: RuntimeDirectory (/run/swr-cache -> here), the unit's
    # Environment= and, as an operator's /etc/swr-cache/env would, VENV for this machine.
    runtime = tmp_path / "run"
    (runtime / "swr-cache").mkdir(parents=True)
    env_unit = {
        name: value.replace("/run/", f"{runtime}/", 1) if value.startswith("/run/") else value
        for name, value in environment(unit).items()
    }
    env_unit["VENV"] = sys.prefix
    port = free_port()
    settings = tmp_path / "settings.toml"
    # No memcached on purpose: the service must start and serve (degraded) without one.
    settings.write_text(
        SETTINGS.read_text(encoding="utf-8").replace(
            'servers = ["127.0.0.1:11211"]', f'servers = ["127.0.0.1:{free_port()}"]'
        ),
        encoding="utf-8",
    )
    notify_name = f"\0swr-cache-test-{uuid.uuid4().hex}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "SERVICE_"))},
        **env_unit,
        "SERVICE_SETTINGS": str(settings),
        "SERVICE_BIND": f"127.0.0.1:{port}",
        "SERVICE_WORKERS": "2",
        "NOTIFY_SOCKET": "@" + notify_name[1:],
    }
    (command,) = values(unit, "Service", "ExecStart")
    argv = expand_command(command, env)
    cwd = last(unit, "Service", "WorkingDirectory")
    assert cwd is not None and cwd.startswith("/")  # this checkout stands in for it
    log = tmp_path / "gunicorn.log"
    url = f"http://127.0.0.1:{port}"

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.bind(notify_name)
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            # Type=notify: READY=1 must come from the main PID (NotifyAccess=main), which
            # also shows that /usr/bin/env exec()s gunicorn in place.
            deadline = time.monotonic() + GUNICORN_READY_TIMEOUT
            sender, text = -1, ""
            while "READY=1" not in text.split("\n"):
                try:
                    sender, text = _notifications(notify, deadline)
                except TimeoutError:
                    pytest.fail(f"no READY=1 from gunicorn:\n{log_tail(log)}")
            assert sender == proc.pid, f"READY=1 came from pid {sender}, main pid {proc.pid}"
            # READY=1 is sent once the socket is bound; workers boot right after.
            _wait_http_ok(url + "/healthz", proc, log, GUNICORN_READY_TIMEOUT)
            status, _, body = http_get(url + "/readyz")
            assert status == 200 and b"degraded" in body, body
            assert (runtime / "swr-cache" / "metrics").is_dir(), (
                "gunicorn.conf.py did not create PROMETHEUS_MULTIPROC_DIR"
            )

            # ExecReload: new workers replace the old ones; the master stays.
            before = set(child_pids(proc.pid))
            assert reload(unit, env, proc.pid) == 0, log_tail(log)
            deadline = time.monotonic() + GUNICORN_READY_TIMEOUT
            while True:
                now = set(child_pids(proc.pid))
                # Both new workers must have finished loading the app (post_worker_init
                # logs the refresher's start), or the broken settings written below would
                # make a still-booting worker fail, and gunicorn stop the master.
                booted = all(f"refresher started in pid {pid}" in log.read_text(
                    encoding="utf-8", errors="replace") for pid in now)
                if len(now) == 2 and not now & before and booted:
                    break
                assert proc.poll() is None, f"gunicorn died on reload:\n{log_tail(log)}"
                assert time.monotonic() < deadline, (
                    f"workers not replaced on reload ({before} -> {now}):\n{log_tail(log)}"
                )
                time.sleep(0.1)
            _wait_http_ok(url + "/healthz", proc, log, GUNICORN_READY_TIMEOUT)

            # A reload with a broken settings file fails before the SIGHUP, and the running
            # workers carry on (without the check, gunicorn's master would stop: "Worker
            # failed to boot").
            good = settings.read_text(encoding="utf-8")
            settings.write_text(good + "\n[cache.typo]\n", encoding="utf-8")
            workers = set(child_pids(proc.pid))
            assert reload(unit, env, proc.pid) != 0, "ExecReload accepted a broken settings file"
            time.sleep(0.5)
            assert proc.poll() is None and set(child_pids(proc.pid)) == workers
            assert http_get(url + "/healthz")[0] == 200
            settings.write_text(good, encoding="utf-8")

            # KillSignal to the main PID only (KillMode=mixed): a clean exit within
            # TimeoutStopSec.
            kill_signal = getattr(signal, last(unit, "Service", "KillSignal") or "SIGTERM")
            limit = seconds(last(unit, "Service", "TimeoutStopSec") or "90")
            started = time.monotonic()
            proc.send_signal(kill_signal)
            code = proc.wait(timeout=limit)
            took = time.monotonic() - started
            assert code == 0, f"gunicorn exited with {code}:\n{log_tail(log)}"
            assert took < limit
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
