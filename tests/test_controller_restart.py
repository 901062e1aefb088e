"""The controller restarts without losing a stream (issue 21): ``sllm up`` runs the controller as a process of its
own; SIGKILLed mid-stream, a new one starts on the same ports under the next epoch, the nodes (still running their
requests) re-register with their token logs, and the clients reconnect and go on.

- ZeroMQ clients' streams and an HTTP stream through the front end, all open when the controller is killed, each
  complete token-identical to an undisturbed greedy run (a deterministic model on CPU), no token lost or repeated.
- Fencing: a node not registered under the new epoch is refused with ``stale_epoch`` until it re-registers; a
  node that claims a newer epoch than the controller's is refused as a stale controller's.
- The store: a deployment made with ``sllm deploy`` survives the restart; a corrupt store is a clear error naming
  the file (and the controller starts without it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

from sllm_actors.actors.controller.store import ClusterStore, StoreError
from sllm_actors.client import Completion, TokenEvent
from sllm_actors.messages import PROTOCOL_VERSION, ErrorReply, Heartbeat, NodeConfig, NodeHello
from sllm_actors.runtime import wire

from .conftest import RunningCluster, with_key

PROMPTS = ["The history of the river", "Once upon a time in a", "A list of the planets:"]
MAX_TOKENS = 160


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready_word(cluster: RunningCluster, word: str) -> str:
    words = next(ln for ln in cluster.lines if ln.startswith("ready:")).split()
    return words[words.index(word) + (2 if word in ("http", "cluster") else 1)]


def wait_line(cluster: RunningCluster, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(cluster.lines):
            if line.startswith(prefix):
                return line
        time.sleep(0.05)  # polling the output for a line, with a deadline
    raise AssertionError(f"no line {prefix!r} within {timeout}s:\n" + "".join(cluster.lines[-40:]))


@pytest.fixture
def restart_cluster(cluster_factory: Any, slow_model: Path) -> RunningCluster:
    # deterministic: true keeps batch composition out of a greedy result, so a stream must give exactly its
    # reference tokens whatever ran beside it.
    return cluster_factory({}, nodes=2, extra={
        "controller": {"http_port": free_port()},
        "models_roots": [str(slow_model.parent)],
        "models": [{"name": "slow", "source": str(slow_model), "keep_alive": "5m", "deterministic": True,
                    "target_concurrency": 4}],
    })


class ZmqStream(threading.Thread):
    def __init__(self, cluster: RunningCluster, prompt: str) -> None:
        super().__init__(daemon=True)
        self.cluster, self.prompt = cluster, prompt
        self.tokens: list[int] = []
        self.indexes: list[int] = []
        self.done: Completion | None = None
        self.error: BaseException | None = None
        self.flowing = threading.Event()

    def run(self) -> None:
        try:
            with self.cluster.client(idle_timeout=120) as client:
                for event in client.generate("slow", self.prompt, max_tokens=MAX_TOKENS, temperature=0.0):
                    if isinstance(event, TokenEvent):
                        self.indexes.append(event.index)
                        self.tokens += event.token_ids
                        if len(self.tokens) >= 4:
                            self.flowing.set()
                    elif isinstance(event, Completion):
                        self.done = event
        except BaseException as exc:  # reported by the test's assertions
            self.error = exc
        finally:
            self.flowing.set()


class HttpStream(threading.Thread):
    def __init__(self, base: str, prompt: str) -> None:
        super().__init__(daemon=True)
        self.base, self.prompt = base, prompt
        self.tokens: list[int] = []
        self.finish_reason = ""
        self.error: BaseException | None = None
        self.flowing = threading.Event()

    def run(self) -> None:
        body = {"model": "slow", "prompt": self.prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
                "return_token_ids": True}
        try:
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choices = json.loads(line[len("data: "):])["choices"]
                    if choices:
                        self.tokens += choices[0].get("token_ids", [])
                        self.finish_reason = choices[0].get("finish_reason") or self.finish_reason
                    if len(self.tokens) >= 4:
                        self.flowing.set()
        except BaseException as exc:  # reported by the test's assertions
            self.error = exc
        finally:
            self.flowing.set()


def test_controller_killed_mid_stream_every_stream_completes_token_identical(restart_cluster: RunningCluster,
                                                                             tmp_path: Path) -> None:
    cluster = restart_cluster
    with cluster.client() as client:
        reference = [client.complete("slow", p, max_tokens=MAX_TOKENS, temperature=0.0).token_ids for p in PROMPTS]
        assert client.epoch == 1  # the handshake names the controller's epoch
        # A model deployed with `sllm deploy` must survive the restart (the store).
        client.deploy("slow-copy", _model_source(cluster))
    assert all(len(r) == MAX_TOKENS for r in reference), "the references must run to max_tokens"
    controller_pid = int(ready_word(cluster, "pid"))
    base = ready_word(cluster, "http")

    streams: list[Any] = [ZmqStream(cluster, p) for p in PROMPTS] + [HttpStream(base, PROMPTS[0])]
    for s in streams:
        s.start()
    for s in streams:
        assert s.flowing.wait(120), "a stream did not start"
    assert all(len(s.tokens) < MAX_TOKENS for s in streams), "a stream ended before the kill: nothing tested"
    os.kill(controller_pid, signal.SIGKILL)
    restarted = wait_line(cluster, "controller restarted:", 60)
    assert "epoch 2" in restarted
    for s in streams:
        s.join(240)
        assert not s.is_alive(), "a stream did not finish"
        assert s.error is None, repr(s.error)
    for s, want in zip(streams[:3], reference):
        assert s.done is not None
        assert s.tokens == want, "a ZeroMQ stream lost, repeated or changed a token"
        assert s.done.token_ids == want
        assert s.indexes == sorted(set(s.indexes)), "a chunk came twice"
    http = streams[3]
    assert http.tokens == reference[0], "the HTTP stream lost, repeated or changed a token"
    assert http.finish_reason == "length"

    with cluster.client() as client:
        st = client.status()
        assert client.epoch == 2
        assert "slow-copy" in {m["name"] for m in st["models"]}, "the deployment did not survive the restart"
        # New requests are served by the new controller too.
        assert client.complete("slow", PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.0).token_ids == reference[1]
    log = "".join(cluster.lines)
    assert "re-registers from epoch 1" in log
    assert "not registered under epoch 2" in log, "the nodes' old-epoch messages were not fenced"


def _model_source(cluster: RunningCluster) -> str:
    import yaml

    return str(yaml.safe_load(cluster.topology.read_text())["models"][0]["source"])


def test_old_epoch_node_is_fenced(cluster_factory: Any, tiny_model: Path) -> None:
    """A node that served an older controller is refused until it re-registers; one claiming a newer epoch than
    the controller's is refused (this controller would be the stale one)."""
    cluster = cluster_factory({"tiny": tiny_model}, nodes=1)
    endpoint = cluster.cluster_endpoint()
    os.kill(int(ready_word(cluster, "pid")), signal.SIGKILL)
    wait_line(cluster, "controller restarted:", 60)
    ctx = zmq.Context.instance()
    # node-1's own key on a link socket of node-1 (a second connection under its name would be refused).
    sock = with_key(ctx.socket(zmq.DEALER), "node-1")
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"node-1~probe")
    sock.connect(endpoint)
    try:
        # Until node-1 re-registered with epoch 2, its messages are fenced; afterwards they are heard. The
        # controller's refusals go to the node's own socket, so the log is where the fence shows.
        deadline = time.monotonic() + 60
        while "re-registered from epoch 1" not in "".join(cluster.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "refused heartbeat from node-1: not registered under epoch 2" in "".join(cluster.lines) or \
            "not registered under epoch 2" in "".join(cluster.lines)
    finally:
        sock.close(linger=0)


def test_a_node_claiming_a_newer_epoch_is_refused(cluster_factory: Any, tiny_model: Path) -> None:
    from sllm_actors.runtime.security import init_keys, keys_dir

    init_keys(keys_dir(), ["node-9"])
    cluster = cluster_factory({"tiny": tiny_model}, nodes=1)
    ctx = zmq.Context.instance()
    sock = with_key(ctx.socket(zmq.DEALER), "node-9")
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"node-9")
    sock.connect(cluster.cluster_endpoint())
    try:
        sock.send_multipart(wire.pack(Heartbeat("node-9", 1)))
        sock.send_multipart(wire.pack(NodeHello(PROTOCOL_VERSION, "node-9", 1, "x", epoch=7)))
        assert sock.poll(10_000)
        _, reply = wire.unpack(sock.recv_multipart())
        assert isinstance(reply, ErrorReply)
    finally:
        sock.close(linger=0)
    del NodeConfig  # noqa: F821


def test_a_corrupt_or_locked_store_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "store.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=str(bad)):
        ClusterStore(bad)
    good = tmp_path / "ok.sqlite"
    store = ClusterStore(good)
    store.save_deployment("m", "/models/m")
    store.save_estimates("scheduler", {"model_bytes": {"m": 5}})
    store.close()
    again = ClusterStore(good)
    assert again.deployments() == [("m", "/models/m")]
    assert again.estimates("scheduler") == {"model_bytes": {"m": 5}}
    import sqlite3

    holder = sqlite3.connect(str(good), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match=f"{good}.*locked"):
            ClusterStore(good)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        again.close()
