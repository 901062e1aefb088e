"""A standby controller on a host of its own (issue 22, item 4), across network namespaces.

Four hosts (``sllm_eval.hosts``: a namespace, an address, a home and a mount namespace each): ``ctl-a`` and
``ctl-b`` run ``sllm up --controller NAME`` (the keys made on ctl-a with ``sllm keys init`` and copied to ctl-b, as
the README says), ``node-a`` and ``node-b`` run ``sllm node --join`` with both controllers' cluster endpoints; etcd
runs in the caller's namespace on the bridge (a host that does not die here). ZeroMQ clients in the caller's
namespace stream greedy requests given both controllers; ctl-a's whole host is killed mid-stream: ctl-b leads and
every stream completes token-identical. Needs root, iproute2 and etcd; skips saying why elsewhere.
"""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sllm_actors.client import Client, Completion, TokenEvent
from sllm_eval.hosts import CONTROLLER_PORTS, Host, Hosts, host_env, unavailable_reason
from sllm_eval.standby_cluster import EtcdProcess, etcd_missing, start_etcd

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The history of the river", "Once upon a time in a"]
MAX_TOKENS = 200
NODES = ("node-a", "node-b")


class Started:
    """A process on a host, its output kept; ``wait(prefix)`` returns the first line starting with it."""

    def __init__(self, host: Host, argv: list[str]) -> None:
        self.proc = host.popen(argv, env=host_env(host), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._lines.put(line)
        self._lines.put("")

    def wait(self, prefix: str, timeout: float) -> str:
        for line in list(self.lines):
            if line.startswith(prefix):
                return line
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                break
            if line.startswith(prefix):
                return line
            if line == "":
                break
        raise AssertionError(f"no line {prefix!r} within {timeout}s:\n" + "".join(self.lines[-60:]))


@pytest.fixture
def standby_hosts(tmp_path: Path, slow_model: Path) -> Iterator[dict[str, Any]]:
    reason = unavailable_reason() or etcd_missing()
    if reason:
        pytest.skip(f"needs network namespaces and etcd: {reason}")
    hosts = Hosts(tmp_path, ["ctl-a", "ctl-b", *NODES], shared=[slow_model.parent])
    etcd: EtcdProcess | None = None
    started: dict[str, Started] = {}
    try:
        etcd = start_etcd(tmp_path, host=hosts.gateway)
        ctl_a, ctl_b = hosts["ctl-a"], hosts["ctl-b"]
        topology = {
            "controller": {"name": "ctl-a", "host": ctl_a.address, **CONTROLLER_PORTS, "http_port": 0},
            "standbys": [{"name": "ctl-b", "host": ctl_b.address, **CONTROLLER_PORTS, "http_port": 0}],
            "etcd": {"endpoints": [etcd.endpoint], "lease_ttl": 2, "prefix": "/sllm/hosts/"},
            "nodes": [{"name": n, "host": n, "gpus": [{"device": "cpu", "memory": "1GiB"}], "threads": 1,
                       "dram": {"capacity": "1GiB"}, "ssd": {"capacity": "2GiB"}} for n in NODES],
            "models": [{"name": "slow", "source": str(slow_model), "keep_alive": "5m", "deterministic": True,
                        "dtype": "float32", "target_concurrency": 4}],
            "models_roots": [str(slow_model.parent)],
        }
        for ctl in (ctl_a, ctl_b):  # each controller's host has the topology file
            (ctl.home / "topology.yaml").write_text(yaml.safe_dump(topology, sort_keys=False))
        cli = [sys.executable, str(REPO / "cli.py")]
        made = ctl_a.run([*cli, "keys", "init", str(ctl_a.home / "topology.yaml")], env=host_env(ctl_a))
        assert made.returncode == 0, made.stdout + made.stderr
        shutil.copytree(ctl_a.home / "keys", ctl_b.home / "keys")  # the README's scp of keys/ to the standby's host
        for n in NODES:
            shutil.copyfile(ctl_a.home / "keys" / "nodes" / f"{n}.key_secret", hosts[n].home / f"{n}.key_secret")
            (hosts[n].home / f"{n}.key_secret").chmod(0o600)
        operator = tmp_path / "operator.key_secret"
        shutil.copyfile(ctl_a.home / "keys" / "operator.key_secret", operator)
        operator.chmod(0o600)
        auth = ctl_a.run([*cli, "keys", "etcd", str(ctl_a.home / "topology.yaml")], env=host_env(ctl_a))
        assert auth.returncode == 0, auth.stdout + auth.stderr
        started["ctl-a"] = Started(ctl_a, [*cli, "up", str(ctl_a.home / "topology.yaml"), "--headless",
                                           "--controller", "ctl-a"])
        join = ",".join(f"tcp://{hosts[c].address}:{CONTROLLER_PORTS['cluster_port']}" for c in ("ctl-a", "ctl-b"))
        for n in NODES:
            started[n] = Started(hosts[n], [*cli, "node", "--join", join, "--name", n,
                                            "--key", str(hosts[n].home / f"{n}.key_secret")])
        started["ctl-a"].wait("ready:", 180)
        started["ctl-b"] = Started(ctl_b, [*cli, "up", str(ctl_b.home / "topology.yaml"), "--headless",
                                           "--controller", "ctl-b"])
        started["ctl-b"].wait("standby:", 120)
        yield {"hosts": hosts, "started": started, "operator": operator,
               "endpoints": ",".join(f"tcp://{hosts[c].address}:{CONTROLLER_PORTS['client_port']}"
                                     for c in ("ctl-a", "ctl-b"))}
    finally:
        for name in ("ctl-b", "ctl-a"):
            if name in started and started[name].proc.poll() is None:
                started[name].proc.send_signal(signal.SIGTERM)
                try:
                    started[name].proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass  # killed with its host below
        for host in hosts.hosts.values():
            host.kill_all()
        hosts.close()
        if etcd is not None:
            etcd.stop()


def test_the_standby_on_its_own_host_takes_over_when_the_leaders_host_dies(standby_hosts: dict[str, Any]) -> None:
    endpoints, operator = standby_hosts["endpoints"], standby_hosts["operator"]
    with Client(endpoints, key=operator, connect_timeout=30) as client:
        reference = [client.complete("slow", p, max_tokens=MAX_TOKENS, temperature=0.0).token_ids for p in PROMPTS]
        assert client.status()["leader"] == "ctl-a"
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    flowing = [threading.Event() for _ in PROMPTS]

    def stream(i: int, prompt: str) -> None:
        tokens: list[int] = []
        try:
            with Client(endpoints, key=operator, idle_timeout=120, connect_timeout=30) as c:
                for event in c.generate("slow", prompt, max_tokens=MAX_TOKENS, temperature=0.0):
                    if isinstance(event, TokenEvent):
                        tokens += event.token_ids
                        flowing[i].set()
                    elif isinstance(event, Completion):
                        results[prompt] = tokens
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            errors.append(exc)
        finally:
            flowing[i].set()

    threads = [threading.Thread(target=stream, args=(i, p), daemon=True) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for f in flowing:
        assert f.wait(120), "a stream did not start"
    assert len(results) < len(PROMPTS), "the streams ended before the kill: nothing tested"
    standby_hosts["hosts"]["ctl-a"].kill_all()  # the leader's whole host stops
    standby_hosts["started"]["ctl-b"].wait("controller leading: ctl-b", 60)
    for t in threads:
        t.join(240)
        assert not t.is_alive(), "a stream did not finish"
    assert not errors, errors
    for prompt, want in zip(PROMPTS, reference):
        assert results[prompt] == want, "a stream lost, repeated or changed a token across the takeover"
    with Client(endpoints, key=operator, connect_timeout=30) as client:
        st = client.status()
        assert st["leader"] == "ctl-b"
        assert sorted(n["name"] for n in st["nodes"] if n["alive"]) == sorted(NODES)
