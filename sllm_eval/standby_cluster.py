"""A cluster with a standby controller, on real processes on loopback: etcd, two controllers, two nodes.

For tests/test_standby.py and benchmarks/bench_takeover.py. :func:`start_etcd` runs Debian's ``etcd`` (3.4) on
ports of its own with a temporary data directory; :class:`StandbyCluster` writes a topology with the two
controllers (``ctl-a``, ``ctl-b``) and the etcd, makes the keys, turns etcd's authentication on with the cluster's
password, and starts ``sllm up --controller ctl-a`` (it leads), the nodes (``sllm node``-style, joined to both
controllers) and ``sllm up --controller ctl-b`` (it stands by). ``stop()`` ends every process it started and
removes etcd's data directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["EtcdProcess", "StandbyCluster", "etcd_missing", "free_port", "start_etcd"]

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_missing() -> str:
    """Why etcd cannot run here ("" when it can)."""
    if shutil.which("etcd") is None:
        return "no etcd binary (Debian: apt-get install etcd-server)"
    return ""


@dataclass
class EtcdProcess:
    proc: subprocess.Popen[bytes]
    endpoint: str
    data_dir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_etcd(work: Path, timeout: float = 30.0, host: str = "127.0.0.1") -> EtcdProcess:
    """etcd on two free ports (its clients' on ``host``: the hosts' bridge, for a cluster across namespaces), its
    data under ``work``; returns once it answers /health."""
    client, peer = free_port(), free_port()
    data = work / "etcd-data"
    endpoint = f"http://{host}:{client}"
    with open(work / "etcd.log", "wb") as log:  # etcd holds its own copy of the descriptor
        proc = subprocess.Popen(
            ["etcd", "--name", "sllm-test", "--data-dir", str(data),
             "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
             f"http://127.0.0.1:{peer}", "--initial-cluster", f"sllm-test=http://127.0.0.1:{peer}"],
            stdout=log, stderr=subprocess.STDOUT)
    etcd = EtcdProcess(proc, endpoint, data)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{endpoint}/health", timeout=1) as r:
                if json.loads(r.read()).get("health") == "true":
                    return etcd
        except (OSError, ValueError):
            pass
        time.sleep(0.1)  # polling etcd's health with a deadline
    etcd.stop()
    raise RuntimeError(f"etcd did not come up within {timeout}s: {(work / 'etcd.log').read_text()[-2000:]}")


@dataclass
class Proc:
    """A process started here, its output kept line by line (and watched for lines)."""

    name: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.times.append(time.monotonic())

    def wait_line(self, prefix: str, timeout: float) -> tuple[str, float]:
        """The first line starting with ``prefix`` and when it came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, line in enumerate(list(self.lines)):
                if line.startswith(prefix):
                    return line, self.times[i]
            if self.proc.poll() is not None and not any(ln.startswith(prefix) for ln in self.lines):
                break
            time.sleep(0.05)  # polling the output for a line, with a deadline
        raise AssertionError(f"{self.name}: no line {prefix!r} within {timeout}s:\n" + "".join(self.lines[-60:]))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class StandbyCluster:
    """etcd, controllers ctl-a (leads first) and ctl-b (stands by), nodes node-1 and node-2, on loopback."""

    def __init__(self, work: Path, models: dict[str, dict[str, Any]], models_root: Path, *, nodes: int = 2,
                 lease_ttl: int = 2) -> None:
        self.work = work
        self.etcd: EtcdProcess | None = None
        self.procs: dict[str, Proc] = {}
        self.node_names = [f"node-{i + 1}" for i in range(nodes)]
        self.models = models
        self.models_root = models_root
        self.lease_ttl = lease_ttl
        self.topology = work / "topology.yaml"
        self.ports = {name: [free_port() for _ in range(4)] for name in ("ctl-a", "ctl-b")}
        """Each controller's client, cluster, state and HTTP ports."""

    @property
    def endpoints(self) -> str:
        """Both controllers' client endpoints: what a client following the leader is given."""
        return ",".join(f"tcp://127.0.0.1:{p[0]}" for p in self.ports.values())

    def client_endpoint(self, controller: str) -> str:
        return f"tcp://127.0.0.1:{self.ports[controller][0]}"

    def http_base(self, controller: str) -> str:
        """The OpenAI API of the front end beside ``controller``."""
        return f"http://127.0.0.1:{self.ports[controller][3]}"

    def _controller(self, name: str) -> dict[str, Any]:
        client, cluster, state, http = self.ports[name]
        return {"name": name, "host": "127.0.0.1", "client_port": client, "cluster_port": cluster,
                "state_port": state, "http_port": http}

    def start(self) -> StandbyCluster:
        from sllm_actors.runtime.etcd import derive_password, enable_auth
        from sllm_actors.runtime.security import KeyRing, init_keys, keys_dir

        self.etcd = start_etcd(self.work)
        data = {
            "controller": self._controller("ctl-a"),
            "standbys": [self._controller("ctl-b")],
            "etcd": {"endpoints": [self.etcd.endpoint], "lease_ttl": self.lease_ttl, "prefix": "/sllm/test/"},
            # A host of their own (not "local"): the nodes are started here as `sllm node` on other hosts is.
            "nodes": [{"name": n, "host": f"host-{n}", "gpus": [{"device": "cpu", "memory": "1GiB"}], "threads": 1,
                       "dram": {"capacity": "1GiB"}, "ssd": {"path": str(self.work / f"ssd-{n}"), "capacity": "2GiB"}}
                      for n in self.node_names],
            "models_roots": [str(self.models_root)],
            "models": [{"name": name, **spec} for name, spec in self.models.items()],
        }
        self.topology.write_text(yaml.safe_dump(data))
        init_keys(keys_dir(), self.node_names)
        enable_auth([self.etcd.endpoint], derive_password(KeyRing(keys_dir()).server_secret))
        self._up("ctl-a")
        for n in self.node_names:
            self._spawn(n, [sys.executable, "-m", "sllm_actors.actors.node", "--name", n,
                            "--join", ",".join(f"tcp://127.0.0.1:{p[1]}" for p in self.ports.values()),
                            "--key", str(keys_dir() / "nodes" / f"{n}.key_secret")])
        self.procs["ctl-a"].wait_line("ready:", 120)
        self._up("ctl-b")
        self.procs["ctl-b"].wait_line("standby:", 60)
        return self

    def _up(self, name: str) -> None:
        self._spawn(name, [sys.executable, str(REPO / "cli.py"), "up", str(self.topology), "--headless",
                           "--controller", name])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        home = self.work / f"home-{name}"
        root = str(REPO)
        env = {**os.environ, "SLLM_HOME": str(home),
               "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.work,
                                env=env, start_new_session=True)
        p = Proc(name, proc)
        threading.Thread(target=p.pump, daemon=True).start()
        self.procs[name] = p

    def controller_pid(self, name: str) -> int:
        line, _ = self.procs[name].wait_line("ready:", 1)
        words = line.split()
        return int(words[words.index("pid") + 1])

    def kill_host(self, name: str) -> float:
        """SIGKILL a controller's host: every process of its ``sllm up`` (the controller, the HTTP front end; each
        ``sllm up`` runs in a session of its own). When it happened."""
        proc = self.procs[name].proc
        at = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return at

    def stop(self) -> None:
        for name in ("ctl-b", "ctl-a"):
            if name in self.procs:
                self.procs[name].stop()
        for n in self.node_names:
            if n in self.procs:
                self.procs[n].stop(timeout=30)
        if self.etcd is not None:
            self.etcd.stop()
