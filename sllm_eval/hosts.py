"""Several hosts on one machine: network namespaces joined by veth links to a bridge, each with an address, a
home directory and a mount namespace of its own, and an sllm cluster spread over them.

A namespace separates the network, not the files, so every process a :class:`Host` starts runs in a mount
namespace of its own (``unshare --mount``) where the other hosts' homes are empty tmpfs mounts and the shared
model repository is read-only: a node cannot open the controller's keys or another node's SSD tier, and
whatever it writes lands under its own home. The bridge lives in the caller's (root) namespace with the subnet's
last address, so the process that built the hosts is the clients' host and reaches every host directly. Traffic
goes only to addresses assigned here (one private /24, checked unused).

:class:`Hosts` removes every process, namespace, link and bridge it made on :meth:`Hosts.close` (also from a
``finally`` after a failure), and :func:`sweep_stale` removes what a killed run left behind (names carry the
owning pid). Faults on a host's link: :meth:`Host.cut` / :meth:`Host.heal` (``ip link set down/up``),
:meth:`Host.limit` (a ``tbf`` bandwidth limit both ways), :meth:`Host.kill_all` (every process SIGKILLed), and
with ``Hosts(..., faults=True)`` :meth:`Host.delay` (every TCP byte across the link held that long each way, by a
user-space relay: ``sllm_eval.link_relay`` says why and what it does not model) and :meth:`Host.loss` (a share of
the link's packets dropped each way, an nftables ``numgen`` rule in the host's namespace; :meth:`Host.lost` counts
them). The kernel here has no netem, so these stand in for ``tc qdisc ... netem delay 20ms loss 1%``.

:func:`start_cluster` brings up ``sllm up`` on one host and ``sllm node --join`` on others, with keys made by
``sllm keys init`` on the controller's host and each node's key file copied to its host, as the README says.
Used by ``tests/test_hosts.py`` and ``demo/hosts.py``. Needs root and iproute2; :func:`unavailable_reason` says
why not when not.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

__all__ = [
    "CONTROLLER_PORTS",
    "Host",
    "HostCluster",
    "Hosts",
    "HostsError",
    "RepositoryHost",
    "faults_unavailable_reason",
    "host_env",
    "start_cluster",
    "start_repository",
    "sweep_stale",
    "unavailable_reason",
]

REPO = Path(__file__).resolve().parent.parent
NETNS_PREFIX = "sllm-"
"""Namespaces are ``sllm-<pid><letter>-<host>``; links ``sb<pid><letter>`` (the bridge) and ``sv<pid><letter>h<i>``
(a host's link, its bridge end): the pid says whose they are, so a sweep can tell a dead run's leftovers from a live run's."""
_LOCK = Path("/run/lock/sllm-hosts.lock")
_instances = itertools.count()
CONTROLLER_PORTS = {"client_port": 7700, "cluster_port": 7701, "state_port": 7702}
"""The README's ports: each host has its own port space, so the defaults never collide."""


class HostsError(RuntimeError):
    """A command that builds or changes the hosts failed; the message has the command and its stderr."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and run.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {run.stderr.strip() or run.returncode}")
    return run


def _sh(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and run.returncode != 0:
        raise HostsError(f"{' '.join(argv)}: {run.stderr.strip() or run.returncode}")
    return run


def unavailable_reason() -> str:
    """Why hosts cannot be made here ('' when they can): tests skip with this."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux's; this is {sys.platform}"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CI runs as root)"
    for tool in ("ip", "unshare", "mount", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2 / util-linux)"
    probe = f"{NETNS_PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


def faults_unavailable_reason() -> str:
    """Why delay and loss cannot be put on links here ('' when they can), on top of :func:`unavailable_reason`."""
    reason = unavailable_reason()
    if reason:
        return reason
    if shutil.which("nft") is None:
        return "nft is not installed (Debian: apt-get install nftables); delay and loss need it"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(netns: str) -> list[int]:
    run = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in run.stdout.split()] if run.returncode == 0 else []


def _kill_netns(netns: str, timeout: float = 15.0) -> None:
    """SIGKILL every process in ``netns`` until none is left (a dying process may still fork)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise HostsError(f"processes {pids} in {netns} outlived SIGKILL for {timeout:.0f}s")
        time.sleep(0.05)  # polling the kernel's view with a deadline: the processes' exit has no event to wait on


def sweep_stale() -> list[str]:
    """Remove namespaces and links of runs whose process is gone (a killed test run); returns their names."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{re.escape(NETNS_PREFIX)}(\d+)[a-z]?-.+", name)
        if m and not _alive(int(m.group(1))):
            _kill_netns(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+: (s[bv](\d+)\w*)[@:]", line)
        if m and not _alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


@contextmanager
def _machine_lock() -> Iterator[None]:
    """Two runs on one machine pick their subnets one after the other, so they never pick the same."""
    _LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(_LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_subnet() -> str:
    """A 10.231.X.0/24 that no address or route of this machine uses yet."""
    used = _ip("-4", "-o", "addr", "show", check=False).stdout + _ip("-4", "route", "show", "table", "all",
                                                                      check=False).stdout
    start = os.getpid() % 200
    for k in range(250):
        x = (start + k) % 250 + 1
        if f"10.231.{x}." not in used:
            return f"10.231.{x}"
    raise HostsError("no free 10.231.X.0/24 subnet on this machine")


@dataclass
class Host:
    """One host: a network namespace with an address, a home directory and its link to the bridge."""

    name: str
    netns: str
    address: str
    home: Path
    veth: str
    """The link's end on the bridge side, in the caller's namespace: where cuts and limits go."""
    hidden: tuple[Path, ...]
    """Directories this host must not see (the other hosts' homes): empty tmpfs mounts in its processes."""
    shared_ro: tuple[Path, ...]
    """Directories every host reads (the model repository): read-only in its processes."""
    relay: subprocess.Popen[str] | None = None
    """The link's delay relay (``Hosts(faults=True)``), in the caller's namespace: it outlives :meth:`kill_all`."""

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host: in its network namespace and a mount namespace of its own."""
        steps = [f"mount -t tmpfs -o size=1m,mode=0700 sllm-hidden {shlex.quote(str(d))}" for d in self.hidden]
        steps += [f"mount --bind {shlex.quote(str(d))} {shlex.quote(str(d))} && "
                  f"mount -o remount,bind,ro {shlex.quote(str(d))}" for d in self.shared_ro]
        script = " && ".join([*steps, 'exec "$@"'])
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", script, "sh", *argv]

    def popen(self, argv: Sequence[str], *, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(argv), env=env, text=True, **kwargs)

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), env=env, text=True, capture_output=True, timeout=timeout,
                              check=False)

    def pids(self) -> list[int]:
        return _netns_pids(self.netns)

    def kill_all(self, timeout: float = 15.0) -> None:
        """The whole host stops: every process in its namespace SIGKILLed, returning once none is left."""
        _kill_netns(self.netns, timeout)

    def cut(self) -> None:
        """The link goes down (both ends lose carrier); packets are dropped until :meth:`heal`."""
        _ip("link", "set", self.veth, "down")

    def heal(self) -> None:
        _ip("link", "set", self.veth, "up")

    def limit(self, rate: str = "100mbit", burst: str = "32kbit", latency: str = "400ms") -> None:
        """A token-bucket bandwidth limit on the link, both ways (the bridge end shapes what reaches the host,
        the host's end what leaves it)."""
        tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        _sh(["tc", "qdisc", "replace", "dev", self.veth, *tbf])
        _sh(["ip", "netns", "exec", self.netns, "tc", "qdisc", "replace", "dev", "eth0", *tbf])

    def unlimit(self) -> None:
        _sh(["tc", "qdisc", "del", "dev", self.veth, "root"], check=False)
        _sh(["ip", "netns", "exec", self.netns, "tc", "qdisc", "del", "dev", "eth0", "root"], check=False)

    def _need_faults(self) -> subprocess.Popen[str]:
        if self.relay is None:
            raise HostsError(f"{self.name}: delay and loss need Hosts(..., faults=True)")
        return self.relay

    def delay(self, ms: float) -> None:
        """Every TCP byte crossing the link waits ``ms`` each way from now on (0: none), also on connections
        already open; returns once the relay applies it."""
        relay = self._need_faults()
        assert relay.stdin is not None and relay.stdout is not None
        if relay.poll() is not None:
            raise HostsError(f"{self.name}: the link's relay exited ({relay.returncode})")
        relay.stdin.write(f"delay {float(ms)}\n")
        relay.stdin.flush()
        answer = relay.stdout.readline().strip()
        if answer != "ok":
            raise HostsError(f"{self.name}: the link's relay answered {answer!r} to a delay")

    def loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets crossing the link, each way, at random (0: none); :meth:`lost`
        counts them."""
        self._need_faults()
        n = round(percent * 100)
        if not 0 <= n <= 10000:
            raise ValueError(f"loss {percent}% is not a percentage")
        rules = [f"flush chain ip {_FAULTS_TABLE} loss_in", f"flush chain ip {_FAULTS_TABLE} loss_out"]
        if n:
            rules += [f'add rule ip {_FAULTS_TABLE} loss_{way} {way[0]}ifname "eth0" numgen random mod 10000 < {n} '
                      'counter name "lost" drop' for way in ("in", "out")]
        _nft(self.netns, "\n".join(rules))

    def lost(self) -> int:
        """Packets the loss rule dropped on this link so far (both ways)."""
        self._need_faults()
        out = _sh(["ip", "netns", "exec", self.netns, "nft", "list", "counter", "ip", _FAULTS_TABLE, "lost"]).stdout
        m = re.search(r"packets (\d+)", out)
        if m is None:
            raise HostsError(f"{self.name}: no packet count in {out!r}")
        return int(m.group(1))

    def clear_faults(self) -> None:
        """No delay and no loss on the link (cuts and limits have :meth:`heal` and :meth:`unlimit`)."""
        if self.relay is not None:
            self.delay(0)
            self.loss(0)

    def _start_faults(self) -> None:
        """The link's relay, and the nftables rules that send the host's TCP through it and drop its losses."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", ""))
                                                           if p)}
        self.relay = subprocess.Popen([sys.executable, "-m", "sllm_eval.link_relay", "--netns", self.netns],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.relay.stdout is not None
        ready = self.relay.stdout.readline().split()
        if len(ready) != 3 or ready[0] != "ready":
            raise HostsError(f"{self.name}: the link's relay did not start: {' '.join(ready)}")
        port_in, port_out = int(ready[1]), int(ready[2])
        from sllm_eval.link_relay import RELAY_MARK

        _nft(self.netns, f"""table ip {_FAULTS_TABLE} {{
  counter lost {{ }}
  chain to_relay_in {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "eth0" meta l4proto tcp redirect to :{port_in}
  }}
  chain to_relay_out {{
    type nat hook output priority -100; policy accept;
    meta mark {RELAY_MARK:#x} return
    oifname "eth0" meta l4proto tcp redirect to :{port_out}
  }}
  chain loss_in {{
    type filter hook input priority filter; policy accept;
  }}
  chain loss_out {{
    type filter hook output priority filter; policy accept;
  }}
}}""")

    def _stop_faults(self) -> None:
        relay, self.relay = self.relay, None
        if relay is None:
            return
        assert relay.stdin is not None
        relay.stdin.close()  # the relay exits when its stdin closes
        try:
            relay.wait(10)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(10)
        if relay.stdout is not None:
            relay.stdout.close()


_FAULTS_TABLE = "sllm_faults"


def _nft(netns: str, script: str) -> None:
    run = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script, capture_output=True,
                         text=True, timeout=30, check=False)
    if run.returncode != 0:
        raise HostsError(f"nft in {netns}: {run.stderr.strip() or run.returncode}\n{script}")


class Hosts:
    """Hosts ``names`` under ``root`` (each host's home is ``root/hosts/NAME``), with ``shared`` directories
    read-only on every host. ``faults=True`` puts every host's TCP through its link's delay relay and readies its
    loss rule (both idle until :meth:`Host.delay` / :meth:`Host.loss`); it needs ``nft``. Use as a context manager,
    or call :meth:`close` in a ``finally``."""

    def __init__(self, root: Path, names: Sequence[str], shared: Sequence[Path] = (), *,
                 faults: bool = False) -> None:
        self.root = Path(root)
        # The pid says whose they are; the letter tells apart several Hosts of one process.
        self.tag = f"{os.getpid()}{chr(ord('a') + next(_instances) % 26)}"
        self.bridge = f"sb{self.tag}"
        self.hosts: dict[str, Host] = {}
        self._made_netns: list[str] = []
        self._made_links: list[str] = []
        homes = {name: self.root / "hosts" / name for name in names}
        try:
            with _machine_lock():
                self.subnet = _free_subnet()
                self.gateway = f"{self.subnet}.254"
                """The bridge's address: the caller's namespace, where clients run."""
                _ip("link", "add", self.bridge, "type", "bridge")
                self._made_links.append(self.bridge)
                _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            if faults and shutil.which("nft") is None:
                raise HostsError(faults_unavailable_reason())
            for i, name in enumerate(names):
                self._add(i, name, homes, tuple(Path(s) for s in shared))
                if faults:
                    self.hosts[name]._start_faults()
        except BaseException:
            self.close()
            raise

    def _add(self, i: int, name: str, homes: dict[str, Path], shared: tuple[Path, ...]) -> None:
        netns = f"{NETNS_PREFIX}{self.tag}-{name}"
        outer, inner = f"sv{self.tag}h{i}", f"sv{self.tag}n{i}"
        _ip("netns", "add", netns)
        self._made_netns.append(netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self._made_links.append(outer)
        _ip("link", "set", inner, "netns", netns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        address = f"{self.subnet}.{i + 1}"
        for args in (("link", "set", "lo", "up"), ("link", "set", inner, "name", "eth0"),
                     ("addr", "add", f"{address}/24", "dev", "eth0"), ("link", "set", "eth0", "up")):
            _ip("-n", netns, *args)
        home = homes[name]
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)
        hidden = tuple(h for other, h in homes.items() if other != name)
        for h in hidden:
            h.mkdir(parents=True, exist_ok=True)
        self.hosts[name] = Host(name, netns, address, home, outer, hidden, shared)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Every process, namespace, link and the bridge this made, gone; safe to call twice."""
        problems = []
        for host in self.hosts.values():  # first: a relay holds sockets in its host's namespace
            host._stop_faults()
        for netns in self._made_netns:
            try:
                _kill_netns(netns)
            except HostsError as exc:
                problems.append(str(exc))
            _ip("netns", "del", netns, check=False)
        self._made_netns.clear()
        for link in reversed(self._made_links):  # a host's veth pair goes with its namespace; this is the rest
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)
        self._made_links.clear()
        if problems:
            raise HostsError("; ".join(problems))


def host_env(host: Host, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment with this host's home as ``$HOME`` and ``$SLLM_HOME``, and nothing that names
    another host's keys or cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("SLLM_KEYS", "SLLM_KEY", "SLLM_CLUSTER")}
    env.update(HOME=str(host.home), SLLM_HOME=str(host.home), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


@dataclass
class HostCluster:
    """A cluster across :class:`Hosts`: ``sllm up`` on ``controller``, ``sllm node --join`` on each node host
    (its host is named as the node). Clients run in the caller's namespace with the operator's key."""

    hosts: Hosts
    controller: Host
    nodes: dict[str, Host]
    topology: Path
    operator_key: Path
    node_keys: dict[str, Path]
    client_endpoint: str
    http_endpoint: str
    python: str
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def cluster_endpoint(self) -> str:
        return f"tcp://{self.controller.address}:{CONTROLLER_PORTS['cluster_port']}"

    def client(self, **kwargs: Any) -> Any:
        from sllm_actors.client import Client

        return Client(self.client_endpoint, key=self.operator_key, **kwargs)

    def start_node(self, name: str) -> None:
        """``sllm node --join`` on the node's host, with the key file copied there."""
        host = self.nodes[name]
        self._spawn(name, host, [self.python, str(REPO / "cli.py"), "node", "--join", self.cluster_endpoint,
                                 "--name", name, "--key", str(self.node_keys[name])])

    def _spawn(self, what: str, host: Host, argv: list[str],
               ready: queue.Queue[str] | None = None) -> subprocess.Popen[str]:
        """Start ``argv`` on ``host``, its output kept in ``logs[what]`` and ``HOME/what.log``; the line that
        starts with ``ready:`` goes to ``ready`` ('' if the process ends first)."""
        proc = host.popen(argv, env=host_env(host), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = self.logs.setdefault(what, [])
        log = (host.home / f"{what}.log").open("a")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                log.write(line)
                log.flush()
                if ready is not None and line.startswith("ready:"):
                    ready.put(line)
            log.close()
            if ready is not None:
                ready.put("")

        threading.Thread(target=pump, daemon=True, name=f"log-{what}").start()
        self.procs[what] = proc
        return proc

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()  # type: ignore[no-any-return]

    def wait_for(self, predicate: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> Any:
        """Poll the controller's status until ``predicate`` holds; fails naming ``what`` and the last status."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
            except ConnectionError as exc:  # unreachable for a while (a cut link, a restart): ask again
                last = exc
            else:
                result = predicate(last)
                if result:
                    return result
            time.sleep(0.1)  # polling a condition with a deadline, not waiting a fixed time
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last status: {last}")

    def node_alive(self, name: str, status: dict[str, Any]) -> bool:
        """Joined, configured and reporting: what the scheduler needs to place or migrate onto the node."""
        return any(n["name"] == name and n["alive"] and n["ready"] for n in status["nodes"])

    def tail(self, n: int = 40) -> str:
        return "\n".join(f"--- {what}\n" + "".join(lines[-n:]) for what, lines in self.logs.items())

    def stop(self) -> None:
        """SIGTERM to ``sllm up`` (which stops what it started), then every process on every host killed."""
        up = self.procs.get("controller")
        if up is not None and up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # killed with its host below
        for host in [*self.nodes.values(), self.controller]:
            host.kill_all()
        for proc in self.procs.values():
            proc.wait(timeout=10)


@dataclass
class RepositoryHost:
    """A model repository served over HTTP from a host of its own (``sllm_eval.repository_server``)."""

    host: Host
    root: Path
    url: str
    """``http://ADDRESS:PORT/``: a model in ``root/NAME`` is ``url + NAME + "/"``."""
    proc: subprocess.Popen[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def start_repository(host: Host, root: Path, port: int = 8080, python: str = sys.executable) -> RepositoryHost:
    """Serve ``root`` (a directory in ``host``'s home, which no other host can open) on ``host``'s address."""
    proc = host.popen([python, "-m", "sllm_eval.repository_server", str(root), "--host", host.address,
                       "--port", str(port)], env=host_env(host), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready: "):
        proc.kill()
        raise HostsError(f"the repository server on {host.name} did not start: {line}{proc.stdout.read()}")
    return RepositoryHost(host, root, line.removeprefix("ready: "), proc)


def start_cluster(hosts: Hosts, models: dict[str, Path | str], *, controller: str = "controller",
                  nodes: Sequence[str] = ("node-a", "node-b"), http_port: int = 0, memory: str = "1GiB",
                  scheduler: dict[str, Any] | None = None, model_options: dict[str, Any] | None = None,
                  python: str = sys.executable, ready_timeout: float = 120.0) -> HostCluster:
    """Keys, topology, ``sllm up`` and the nodes, the README's way; returns once ``sllm up`` says ready.

    ``models``: name -> a checkpoint directory in one of the hosts' shared directories (prepared before the
    hosts start: no host downloads anything), or the ``http://`` URL of one on a repository host
    (:func:`start_repository`; its root URL goes into the topology's ``repositories``). The topology names no SSD
    path, so each node's tiers are under its own ``$SLLM_HOME``."""
    ctl = hosts[controller]
    topology = ctl.home / "topology.yaml"
    urls = {name: str(s) for name, s in models.items() if str(s).startswith(("http://", "https://"))}
    roots = sorted({str(Path(p).parent) for name, p in models.items() if name not in urls})
    repositories = sorted({u.rstrip("/").rsplit("/", 1)[0] + "/" for u in urls.values()})
    topology.write_text(yaml.safe_dump({
        "controller": {"host": ctl.address, **CONTROLLER_PORTS, "http_port": http_port},
        "nodes": [{"name": name, "host": name, "gpus": [{"device": "cpu", "memory": memory}], "threads": 1,
                   "dram": {"capacity": "1GiB"}, "ssd": {"capacity": "2GiB"}} for name in nodes],
        "models": [{"name": name, "source": str(path), "keep_alive": "5m", **(model_options or {})}
                   for name, path in models.items()],
        "models_roots": roots,
        **({"repositories": repositories} if repositories else {}),
        **({"scheduler": scheduler} if scheduler else {}),
    }, sort_keys=False))
    env = host_env(ctl)
    made = ctl.run([python, str(REPO / "cli.py"), "keys", "init", str(topology)], env=env)
    if made.returncode != 0:
        raise HostsError(f"sllm keys init on {controller}: {made.stdout}{made.stderr}")
    keys = ctl.home / "keys"
    node_keys = {}
    for name in nodes:  # the README's `scp`: each node host gets its own key file and no other
        dest = hosts[name].home / f"{name}.key_secret"
        shutil.copyfile(keys / "nodes" / f"{name}.key_secret", dest)
        dest.chmod(0o600)
        node_keys[name] = dest
    client_home = hosts.root / "client"
    client_home.mkdir(exist_ok=True, mode=0o700)
    operator = client_home / "operator.key_secret"
    shutil.copyfile(keys / "operator.key_secret", operator)
    operator.chmod(0o600)
    cluster = HostCluster(
        hosts, ctl, {name: hosts[name] for name in nodes}, topology, operator, node_keys,
        client_endpoint=f"tcp://{ctl.address}:{CONTROLLER_PORTS['client_port']}",
        http_endpoint=f"http://{ctl.address}:{http_port}" if http_port else "", python=python)
    try:
        ready: queue.Queue[str] = queue.Queue()
        cluster._spawn("controller", ctl, [python, str(REPO / "cli.py"), "up", str(topology), "--headless",
                                           "--ready-timeout", str(ready_timeout)], ready=ready)
        for name in nodes:
            cluster.start_node(name)
        try:
            line = ready.get(timeout=ready_timeout + 30)
        except queue.Empty:
            line = ""
        if not line:
            raise HostsError(f"sllm up on {controller} did not print ready:\n{cluster.tail()}")
        cluster.wait_for(lambda st: all(cluster.node_alive(n, st) for n in nodes), ready_timeout,
                         f"nodes {', '.join(nodes)} to join")
    except BaseException:
        cluster.stop()
        raise
    return cluster
