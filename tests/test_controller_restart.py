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

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from sllm_actors.actors.controller.store import ClusterStore, StoreError
from sllm_actors.messages import PROTOCOL_VERSION, ErrorReply, Heartbeat, NodeConfig, NodeHello, NodeStatus
from sllm_actors.runtime import wire

from . import streams
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


def ZmqStream(cluster: RunningCluster, prompt: str) -> streams.ZmqStream:
    """A greedy stream through the cluster's own client."""
    return streams.ZmqStream(lambda: cluster.client(idle_timeout=120), prompt, MAX_TOKENS)


def HttpStream(base: str, prompt: str) -> streams.HttpStream:
    return streams.HttpStream(base, prompt, MAX_TOKENS, flowing_after=4)


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
    # The HTTP stream first (the front end adds a hop): the kill must find every stream mid-way.
    streams[3].start()
    assert streams[3].flowing.wait(120), "the HTTP stream did not start"
    for s in streams[:3]:
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
        assert client.epoch == st["epoch"] == 2
        assert "slow-copy" in {m["name"] for m in st["models"]}, "the deployment did not survive the restart"
        # New requests are served by the new controller too.
        assert client.complete("slow", PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.0).token_ids == reference[1]
    log = "".join(cluster.lines)
    assert "re-registers from epoch 1" in log
    assert "not registered under epoch 2" in log, "the nodes' old-epoch messages were not fenced"


def _model_source(cluster: RunningCluster) -> str:
    import yaml

    return str(yaml.safe_load(cluster.topology.read_text())["models"][0]["source"])


class FakeNode(threading.Thread):
    """A node on "another host" speaking the protocol by hand, so the test sees the controller's answers: it joins,
    reports itself ready and beats, and keeps every message the controller sends it."""

    def __init__(self, endpoint: str, name: str) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.name = endpoint, name
        self.got: list[Any] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.beating = threading.Event()
        self.beating.set()
        self.outbox: list[Any] = []

    def send(self, msg: Any) -> None:
        with self.lock:
            self.outbox.append(msg)

    def wait_for(self, what: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for msg in self.got:
                    if what(msg):
                        self.got.remove(msg)
                        return msg
            time.sleep(0.02)  # polling what the thread received, with a deadline
        raise AssertionError(f"{self.name}: nothing matching within {timeout}s; got {self.got[-5:]}")

    def run(self) -> None:
        sock = with_key(zmq.Context.instance().socket(zmq.DEALER), self.name)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.name.encode())
        sock.connect(self.endpoint)
        configured, seq, last = False, 0, 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now - last > 0.5:
                    last, seq = now, seq + 1
                    if not configured:
                        sock.send_multipart(wire.pack(NodeHello(PROTOCOL_VERSION, self.name, 1, "fake-1")))
                    elif self.beating.is_set():
                        sock.send_multipart(wire.pack(Heartbeat(self.name, seq)))
                with self.lock:
                    out, self.outbox = self.outbox, []
                for msg in out:
                    sock.send_multipart(wire.pack(msg))
                if sock.poll(50):
                    _, msg = wire.unpack(sock.recv_multipart())
                    if isinstance(msg, NodeConfig) and not configured:
                        configured = True
                        sock.send_multipart(wire.pack(NodeStatus(self.name, {
                            "incarnation": "fake-1", "gpus": [], "instances": [], "tiers": []})))
                    with self.lock:
                        self.got.append(msg)
        finally:
            sock.close(linger=0)


def test_a_node_of_an_older_epoch_is_fenced_until_it_re_registers_and_a_bad_store_is_named(cluster_factory: Any, tiny_model: Path,
                                                                 tmp_path: Path) -> None:
    from sllm_actors.runtime.security import init_keys, keys_dir

    init_keys(keys_dir(), ["node-9"])
    port = free_port()
    fake = FakeNode(f"tcp://127.0.0.1:{port}", "node-9")
    fake.start()
    try:
        cluster = cluster_factory({"tiny": tiny_model}, nodes=1, extra={
            "controller": {"cluster_port": port},
            "nodes": [
                {"name": "node-1", "gpus": [{"device": "cpu", "memory": "1GiB"}], "threads": 1,
                 "ssd": {"path": str(tmp_path / "ssd-1"), "capacity": "2GiB"}},
                # Too small for any model: nothing is ever placed on the fake node.
                {"name": "node-9", "host": "elsewhere", "gpus": [{"device": "cpu", "memory": "1MiB"}]},
            ],
        })
        first = fake.wait_for(lambda m: isinstance(m, NodeConfig), 10)
        assert first.epoch == 1
        # The store goes bad meanwhile: the restarted controller says which file, and starts without it.
        (store,) = (cluster.topology.parent / "home" / "clusters").glob("*/store.sqlite")
        os.kill(int(ready_word(cluster, "pid")), signal.SIGKILL)
        store.write_bytes(b"not a database" * 1000)
        wait_line(cluster, "controller restarted:", 60)
        # node-9 served epoch 1: what it sends the new controller is refused, and it is told to re-register.
        refused = fake.wait_for(lambda m: isinstance(m, ErrorReply) and m.code == "stale_epoch", 30)
        assert "epoch 2" in refused.message
        assert not any(isinstance(m, NodeConfig) and m.epoch == 2 for m in fake.got)
        # A hello claiming a newer epoch than the controller's: this controller would be the stale one.
        fake.send(NodeHello(PROTOCOL_VERSION, "node-9", 1, "fake-1", epoch=7))
        stale = fake.wait_for(lambda m: isinstance(m, ErrorReply) and m.code == "stale_controller", 10)
        assert "epoch 7" in stale.message
        # Re-registering under the new epoch is accepted: a config of epoch 2, and no more refusals.
        fake.send(NodeHello(PROTOCOL_VERSION, "node-9", 1, "fake-1", epoch=1))
        fake.wait_for(lambda m: isinstance(m, NodeConfig) and m.epoch == 2, 10)
        assert f"the cluster store {store} is corrupt or not a SQLite database" in "".join(cluster.lines)
        with fake.lock:
            fake.got.clear()
        with pytest.raises(AssertionError):
            fake.wait_for(lambda m: isinstance(m, ErrorReply) and m.code == "stale_epoch", 3)
        fake.stop.set()
        # Gone quiet, it is declared dead (the teardown's orphan check then leaves its made-up pid alone).
        cluster.wait_for(lambda st: not any(n["name"] == "node-9" and n["alive"] for n in st["nodes"]), 30,
                         "the fake node declared dead")
    finally:
        fake.stop.set()
        fake.join(5)


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


def test_a_new_sllm_up_adopts_the_nodes_of_a_killed_one(tmp_path: Path, slow_model: Path) -> None:
    """SIGKILL of ``sllm up`` itself: its controller dies with it, the nodes keep their requests, and a new
    ``sllm up`` on the same topology comes back on the same ports, adopts the nodes (no new node process) and the
    ZeroMQ streams go on, token-identical."""
    from .conftest import start_cluster, stop_cluster, write_topology

    topo = write_topology(tmp_path / "topology.yaml", {}, nodes=1, extra={
        "models": [{"name": "slow", "source": str(slow_model), "keep_alive": "5m", "deterministic": True}]})
    first = start_cluster(topo)
    second = None
    try:
        with first.client() as client:
            want = client.complete("slow", PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0.0).token_ids
        pids = first.node_pids()
        stream = ZmqStream(first, PROMPTS[2])
        stream.start()
        assert stream.flowing.wait(120)
        first.proc.kill()
        first.proc.wait(30)
        second = start_cluster(topo)
        assert second.endpoint == first.endpoint, "the new sllm up binds the ports of the killed one"
        assert "epoch 2" in next(ln for ln in second.lines if ln.startswith("ready:"))
        assert second.node_pids() == pids, "the nodes were adopted, not started again"
        stream.join(240)
        assert stream.error is None, repr(stream.error)
        assert stream.done is not None and stream.tokens == want
    finally:
        if second is not None:
            stop_cluster(second)
        elif first.proc.poll() is None:
            stop_cluster(first)


def test_a_resumed_stream_takes_only_the_tokens_it_lacks() -> None:
    from sllm_actors.client import resume_request, take_new
    from sllm_actors.messages import GenerateRequest, TokenChunk

    chunk = TokenChunk("r", 0, [1, 2, 3], "abc")
    assert take_new(chunk, []) == chunk
    assert take_new(chunk, [1, 2, 3]) is None, "a repeated chunk"
    # A restarted router resends from the client's offset; an overlap keeps only the new token (its text is not
    # split per token, so the overlap's text goes with the chunk that first carried it).
    assert take_new(TokenChunk("r", 1, [2, 3, 4], "bcd"), [1, 2, 3]) == TokenChunk("r", 3, [4], "")
    assert take_new(TokenChunk("r", 5, [6], "x"), [1, 2, 3]) is None, "past a gap"
    again = resume_request(GenerateRequest("r", "m", "p", max_tokens=9), [1, 2], "ab")
    assert (again.resume, again.resume_ids, again.resume_text, again.max_tokens) == (True, [1, 2], "ab", 9)
