"""Fixtures that start real clusters (real processes, real sockets) and stop everything they start."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def cluster_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One key directory for the session: the first `sllm up` on loopback makes the keys there, and every
    client of the tests (in this process or a `sllm` subprocess) finds the operator's key in it."""
    keys = tmp_path_factory.mktemp("home") / "keys"
    saved = os.environ.get("SLLM_KEYS")
    os.environ["SLLM_KEYS"] = str(keys)
    yield keys
    if saved is None:
        os.environ.pop("SLLM_KEYS", None)
    else:
        os.environ["SLLM_KEYS"] = saved


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sllm_eval.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sllm_eval.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", arch="gpt2", seed=1)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 10 ms a token on one CPU thread: slow enough that a migration lands mid-stream."""
    from sllm_eval.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "slow-llama", arch="llama", seed=7, hidden_size=384,
                           layers=6)


def with_key(sock: Any, who: str = "operator") -> Any:
    """Give a raw test socket (before connect) the session's key of ``who``: "operator" or a node's name."""
    from sllm_actors.runtime.security import find_credentials, keys_dir, load_credentials

    creds = (find_credentials() if who == "operator"
             else load_credentials(keys_dir() / "nodes" / f"{who}.key_secret"))
    assert creds is not None, f"no key for {who} under {keys_dir()}"
    creds.apply_client(sock)
    return sock


@dataclass
class RunningCluster:
    proc: subprocess.Popen[str]
    endpoint: str
    state_endpoint: str
    topology: Path
    lines: list[str]

    def client(self, **kwargs: Any) -> Any:
        from sllm_actors.client import Client

        return Client(self.endpoint, **kwargs)

    def cluster_endpoint(self) -> str:
        """The nodes' socket (from the ready line)."""
        for line in self.lines:
            if line.startswith("ready:"):
                words = line.split()
                return words[words.index("cluster") + 2]
        raise AssertionError("no ready line")

    def node_pids(self) -> dict[str, int]:
        with self.client() as c:
            return {n["name"]: n["pid"] for n in c.status()["nodes"] if n["alive"]}

    def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with self.client() as c:
                last = c.status()
            result = predicate(last)
            if result:
                return result
            time.sleep(0.1)  # polling a condition with a deadline, not waiting a fixed time
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last status: {last}")


def write_topology(path: Path, models: dict[str, Path | str], *, nodes: int = 2, gpus_per_node: int = 1,
                   memory: str = "1GiB", extra: dict[str, Any] | None = None, keep_alive: str = "5m",
                   dram: str = "1GiB", ssd: str = "2GiB", repository_bandwidth: str = "",
                   dtype: str = "float32") -> Path:
    """A topology of ``nodes`` CPU nodes serving ``models``. ``dtype``: the models' serving dtype, pinned so that
    tests comparing outputs compare the same arithmetic on every CPU (the default is bf16 where the CPU has
    native bf16 products); "" for the default."""
    data: dict[str, Any] = {
        # http_port 0: no HTTP front end unless a test asks for one (tests/test_http.py).
        "controller": {"host": "127.0.0.1", "client_port": 0, "cluster_port": 0, "state_port": 0, "http_port": 0},
        "nodes": [
            {
                "name": f"node-{i + 1}",
                "gpus": [{"device": "cpu", "memory": memory} for _ in range(gpus_per_node)],
                "threads": 1,
                "dram": {"capacity": dram},
                "ssd": {"path": str(path.parent / f"ssd-{i + 1}"), "capacity": ssd},
                **({"repository": {"bandwidth": repository_bandwidth}} if repository_bandwidth else {}),
            }
            for i in range(nodes)
        ],
        "models": [{"name": name, "source": str(src), "keep_alive": keep_alive, **({"dtype": dtype} if dtype else {})}
                   for name, src in models.items()],
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def start_cluster(topology: Path, env: dict[str, str] | None = None, timeout: float = 120.0) -> RunningCluster:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "up", str(topology), "--headless"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=topology.parent,
        env={**os.environ, "SLLM_HOME": str(topology.parent / "home"), **(env or {})},
    )
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                ready.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        line = ready.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise AssertionError("sllm up did not print ready:\n" + "".join(lines[-50:])) from None
    words = line.split()
    return RunningCluster(proc, words[words.index("client") + 2], words[words.index("state") + 2], topology, lines)


def stop_cluster(cluster: RunningCluster) -> None:
    pids = []
    try:
        pids = list(cluster.node_pids().values())
    except Exception:
        pass  # the cluster may already be down; the process check below still runs
    if cluster.proc.poll() is None:
        cluster.proc.send_signal(signal.SIGTERM)
        try:
            cluster.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.proc.kill()
            cluster.proc.wait()
            raise AssertionError("sllm up did not stop within 60s of SIGTERM")
    for pid in pids:
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"node process {pid} outlived sllm up (an orphan)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[RunningCluster] = []

    def make(models: dict[str, Path | str], **kwargs: Any) -> RunningCluster:
        env = kwargs.pop("env", None)
        topo = write_topology(tmp_path / f"topology-{len(started)}.yaml", models, **kwargs)
        cluster = start_cluster(topo, env=env)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        stop_cluster(cluster)


@pytest.fixture
def cluster(cluster_factory: Any, tiny_model: Path) -> RunningCluster:
    return cluster_factory({"tiny": tiny_model})
