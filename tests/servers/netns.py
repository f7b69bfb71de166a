"""A fleet on one machine: app hosts and memcached nodes in network namespaces of their own.

:class:`NetBed` makes, for one test module, a bridge in the root namespace (``swr<pid>-<n>``)
and one namespace per member, each joined to the bridge by a veth pair and given an address
of its own in a private /24 (``10.a.b.0/24``, derived from the pid and checked against the
machine's routes, so concurrent runs do not collide). The root namespace holds the bridge's
address (``.1``): the test process, the origin and nginx live there and reach every member.

Processes run inside a namespace through ``ip netns exec NAME argv...``, which execs
``argv`` in place, so the process we started is the server itself (SIGSTOP, SIGKILL and
``wait()`` reach it directly). memcached nodes are named (``mc1:11211`` ...) in the
service's settings and resolved per host through ``/etc/netns/NAME/hosts`` (``ip netns
exec`` mounts it over ``/etc/hosts``): every host hashes keys over the same names, and one
host can be pointed at a TCP proxy in front of a node without moving any key.

Faults without netem or iptables:

- :meth:`NetBed.cut` partitions two members from each other only: each gets a permanent
  neighbour entry for the other's address with a MAC address nobody owns, so their frames
  are flooded by the bridge and dropped by every other member's interface: packets vanish,
  as on a real partition (no refusal, no ICMP); :meth:`NetBed.heal` restores them. (Taking
  a veth down would cut the member from everyone, nginx included, not from one peer.)
- delay, loss and stalls: ``tests/servers/tcpproxy.py`` between one host and one node
  (:class:`TcpProxyProcess`; this kernel has no netem).

Everything is removed by :meth:`NetBed.close` (the fixture's finalizer), also after a
failure: the namespaces (after the processes in them are stopped), their hosts files, the
veths and the bridge. :func:`require_netns` skips (or fails on CI) where this cannot run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .base import (
    REPO_ROOT,
    STOP_TIMEOUT,
    ServerProcess,
    _reap,
    free_port,
    http_get,
)
from .gunicorn import GunicornProcess
from .memcached import MemcachedProcess
from .origin import OriginServer

IP = "ip"
NGINX = "/usr/sbin/nginx"
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
MEMCACHED_PORT = 11211
APP_PORT = 8000
NETNS_ETC = Path("/etc/netns")
# A locally administered unicast MAC that no member has: frames sent to it go nowhere.
NOWHERE_MAC = "02:00:5e:00:53:01"

_beds = itertools.count()


def _missing(what: str, fix: str) -> None:
    """Fail on CI (where the fleet must run), skip elsewhere, naming what is missing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}, and CI must run the fleet in network namespaces: {fix}")
    pytest.skip(f"{what}: the fleet in network namespaces needs it ({fix})")


def require_netns() -> None:
    """Root, ``ip netns`` that works, and nginx: skip with the reason, or fail on CI."""
    if os.geteuid() != 0:
        _missing("not root", "run the netns tests as root, e.g. `sudo make fleet`")
    if shutil.which(IP) is None:
        _missing("iproute2's `ip` not found", "apt-get install iproute2")
    probe = f"swrprobe{os.getpid()}"
    added = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        _missing(f"`ip netns add` failed ({added.stderr.strip()})",
                 "a kernel and container that allow network namespaces (CAP_SYS_ADMIN)")
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    if not os.access(NGINX, os.X_OK):
        _missing(f"nginx not found at {NGINX}", "apt-get install nginx (make sysdeps-test)")


def require_faketime() -> str:
    """libfaketime's preload library (Debian's ``faketime``): skip, or fail on CI."""
    if not os.access(LIBFAKETIME, os.R_OK):
        _missing(f"libfaketime not found at {LIBFAKETIME}", "apt-get install faketime")
    return LIBFAKETIME


def _run(argv: Sequence[str]) -> str:
    """Run one ``ip`` command; a failure raises with the command and its error."""
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    found = []
    for line in _run([IP, "-4", "route", "show", "table", "all"]).splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "blackhole", "prohibit"):
            word = line.split()[1]
        with contextlib.suppress(ValueError):
            if word != "default":
                found.append(ipaddress.ip_network(word, strict=False))
    return found


def choose_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 derived from ``seed`` that no route of this machine overlaps."""
    used = _subnets_in_use()
    for step in range(256):
        n = (seed * 2654435761 + step * 40503) % (256 * 256)
        net = ipaddress.ip_network(f"10.{n >> 8}.{n & 255}.0/24")
        if not any(net.overlaps(other) for other in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the test fleet")


@dataclass
class Member:
    """One namespace on the bridge: its name, address and the host end of its veth."""

    name: str
    role: str
    address: str
    veth: str
    mac: str = ""

    def exec(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` execs it in place)."""
        return [IP, "netns", "exec", self.name, *argv]


@dataclass
class NetBed:
    """A bridge and namespaces on it, made for one test module (see the module docstring)."""

    tag: str
    subnet: ipaddress.IPv4Network
    members: dict[str, Member] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"swr{self.tag}"

    @property
    def prefix(self) -> str:
        """The start of every namespace's name."""
        return f"swr{self.tag}"

    @classmethod
    def create(cls) -> NetBed:
        index = next(_beds)
        pid = os.getpid()
        bed = cls(tag=f"{pid}-{index}", subnet=choose_subnet(pid * 7 + index))
        try:
            bed.links.append(bed.bridge)
            _run([IP, "link", "add", bed.bridge, "type", "bridge"])
            _run([IP, "addr", "add", f"{bed.gateway}/24", "dev", bed.bridge])
            _run([IP, "link", "set", bed.bridge, "up"])
        except BaseException:
            bed.close()
            raise
        return bed

    @property
    def gateway(self) -> str:
        """The bridge's own address, in the root namespace."""
        return str(self.subnet.network_address + 1)

    def add(self, role: str, hosts: dict[str, str] | None = None) -> Member:
        """A new namespace ``role`` on the bridge with the next address; ``hosts`` (name ->
        address) become its ``/etc/hosts``."""
        number = len(self.members) + 2
        name = f"{self.prefix}-{role}"
        # Interface names have at most 15 characters: "s" + pid (<= 7) + "-n" + "v" + 2.
        veth, peer = f"s{self.tag}v{number}", f"s{self.tag}p{number}"
        member = Member(name, role, str(self.subnet.network_address + number), veth)
        self.members[role] = member
        _run([IP, "netns", "add", name])
        self.links.append(veth)
        _run([IP, "link", "add", veth, "type", "veth", "peer", "name", peer])
        _run([IP, "link", "set", veth, "master", self.bridge, "up"])
        _run([IP, "link", "set", peer, "netns", name])
        inside = [IP, "netns", "exec", name, IP]
        _run([*inside, "link", "set", peer, "name", "eth0"])
        _run([*inside, "addr", "add", f"{member.address}/24", "dev", "eth0"])
        _run([*inside, "link", "set", "eth0", "up"])
        _run([*inside, "link", "set", "lo", "up"])
        link = _run([*inside, "-o", "link", "show", "eth0"])
        member.mac = link.split("link/ether", 1)[1].split()[0]
        self.write_hosts(member, hosts or {})
        return member

    def write_hosts(self, member: Member, hosts: dict[str, str]) -> None:
        """``/etc/hosts`` as processes started in ``member`` from now on see it."""
        folder = NETNS_ETC / member.name
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", f"{member.address} {member.role}"]
        lines += [f"{address} {name}" for name, address in hosts.items()]
        (folder / "hosts").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _neighbour(self, member: Member, other: Member, mac: str | None) -> None:
        argv = [IP, "netns", "exec", member.name, IP, "neigh", "replace", other.address,
                "lladdr", mac or other.mac, "dev", "eth0", "nud", "permanent"]
        _run(argv)

    def cut(self, a: Member, b: Member) -> None:
        """Partition ``a`` and ``b`` from each other only: their frames to each other go to
        a MAC address nobody has, so they vanish (no refusal, no ICMP); both still reach
        everyone else."""
        self._neighbour(a, b, NOWHERE_MAC)
        self._neighbour(b, a, NOWHERE_MAC)

    def heal(self, a: Member, b: Member) -> None:
        """Undo :meth:`cut`: the right addresses again (pinned, so nothing is re-learnt)."""
        self._neighbour(a, b, None)
        self._neighbour(b, a, None)

    def close(self) -> None:
        """Remove every namespace, hosts file, veth and the bridge (errors ignored: the
        finalizer must get through all of them). Stop the processes in them first."""
        for member in self.members.values():
            subprocess.run([IP, "netns", "del", member.name], capture_output=True)
            shutil.rmtree(NETNS_ETC / member.name, ignore_errors=True)
        for link in reversed(self.links):
            # A veth whose peer went with its namespace is gone already: nothing to do.
            subprocess.run([IP, "link", "del", link], capture_output=True)

    def leftovers(self) -> list[str]:
        """What of this bed still exists (for a test that checks the clean-up)."""
        names = _run([IP, "netns", "list"]).split()
        found = [m.name for m in self.members.values() if m.name in names]
        links = {line.split(":")[1].strip().split("@")[0]
                 for line in _run([IP, "-o", "link", "show"]).splitlines()}
        found += [link for link in self.links if link in links]
        found += [str(NETNS_ETC / m.name) for m in self.members.values()
                  if (NETNS_ETC / m.name).exists()]
        return found


# --------------------------------------------------------------------------------------------
# The servers, inside namespaces
# --------------------------------------------------------------------------------------------


class NsMemcached(MemcachedProcess):
    """memcached on ``member``'s own address, port 11211, started inside its namespace."""

    def __init__(self, binary: str, log_dir: Path, member: Member) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(binary, log_dir, port=MEMCACHED_PORT)
        self.member = member
        self.host = member.address

    def command(self) -> list[str]:
        return self.member.exec(super().command())


class NsGunicorn(GunicornProcess):
    """gunicorn with the shipped config on ``member``'s address, inside its namespace.

    ``skew`` runs it under libfaketime with its wall clock that many seconds off (the
    stat() of files is left alone; the monotonic clock moves by the same offset, which
    no one can see: it has no meaning across processes).
    """

    def __init__(self, settings_path: Path, log_dir: Path, member: Member, workers: int,
                 skew: float = 0.0) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {"SERVICE_BIND": f"{member.address}:{APP_PORT}"}
        if skew:
            env.update(LD_PRELOAD=require_faketime(), FAKETIME=f"{skew:+g}s",
                       NO_FAKE_STAT="1")
        super().__init__(settings_path, log_dir, workers=workers, env=env, port=APP_PORT)
        self.member = member
        self.host = member.address
        self.skew = skew

    def command(self) -> list[str]:
        return self.member.exec(super().command())


class GatewayOrigin(OriginServer):
    """The counting origin on the bridge's address in the root namespace (every host
    reaches it; it is no member, so no fault touches it)."""

    def __init__(self, log_dir: Path, address: str) -> None:
        super().__init__(log_dir)
        self.host = address

    def command(self) -> list[str]:
        return [*super().command(), "--host", self.host]


NGINX_CONF = """\
# Written by tests/servers/netns.py: a plain reverse proxy over the fleet's app hosts,
# no proxy cache, so every fault reaches the service.
{user}
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream app_hosts {{
{servers}
        keepalive 64;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://app_hosts;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_connect_timeout 2s;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""


class NginxFront(ServerProcess):
    """Debian's nginx in the root namespace on a free loopback port, round-robin over the
    app hosts, with its own prefix, pid file and logs under ``prefix``."""

    name = "nginx"
    start_timeout = 10.0

    def __init__(self, prefix: Path, upstreams: Sequence[str]) -> None:
        self.prefix = prefix
        self.upstreams = list(upstreams)
        self.port = free_port()
        self.log_path = prefix / "nginx.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def where(self) -> str:
        return self.url

    def prepare(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        text = NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "",
            prefix=self.prefix, listen=f"127.0.0.1:{self.port}",
            servers="\n".join(f"        server {u} max_fails=0;" for u in self.upstreams))
        (self.prefix / "nginx.conf").write_text(text, encoding="utf-8")

    def command(self) -> list[str]:
        return [NGINX, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")]

    def probe(self) -> tuple[bool, str]:
        try:
            status, _, _ = http_get(self.url + "/healthz", timeout=2.0)
        except OSError as exc:
            return False, f"/healthz: {exc!r}"
        return status == 200, f"/healthz answered {status}"

    def next_attempt(self, attempt: int) -> bool:
        self.port = free_port()
        return True

    def exit_report(self) -> str:
        error_log = self.prefix / "error.log"
        tail = error_log.read_text(errors="replace")[-2000:] if error_log.exists() else ""
        return f"error log:\n{tail}"

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return _reap(self.proc, signal.SIGTERM, STOP_TIMEOUT)


class TcpProxyProcess(ServerProcess):
    """``tests/servers/tcpproxy.py`` inside ``member``: listens on its address, forwards to
    ``target``; faults are set through its control port (see that module)."""

    name = "tcpproxy"
    start_timeout = 10.0

    def __init__(self, log_dir: Path, member: Member, listen_port: int, target: str,
                 python: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.member = member
        self.listen_port = listen_port
        self.control_port = listen_port + 1
        self.target = target
        self.python = python
        self.log_path = log_dir / "tcpproxy.log"

    @property
    def where(self) -> str:
        return f"{self.member.address}:{self.listen_port}"

    def command(self) -> list[str]:
        script = str(REPO_ROOT / "tests" / "servers" / "tcpproxy.py")
        return self.member.exec([
            self.python, script, "--listen", f"{self.member.address}:{self.listen_port}",
            "--control", f"{self.member.address}:{self.control_port}",
            "--target", self.target])

    def probe(self) -> tuple[bool, str]:
        try:
            return self.control("status").startswith("ok"), "status"
        except OSError as exc:
            return False, f"control: {exc!r}"

    def control(self, line: str, timeout: float = 5.0) -> str:
        """Send one control line (``delay 0.05``, ``loss 0.05 0.2 0.6``, ``hold``,
        ``release``, ``reset``, ``status``); return the proxy's one-line answer."""
        import socket

        with socket.create_connection((self.member.address, self.control_port),
                                      timeout=timeout) as sock:
            sock.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        answer = data.decode().strip()
        if not answer.startswith("ok"):
            raise RuntimeError(f"tcpproxy refused {line!r}: {answer}")
        return answer

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return _reap(self.proc, signal.SIGTERM, STOP_TIMEOUT)

    def spawn_options(self) -> dict[str, Any]:
        return {"cwd": REPO_ROOT}
