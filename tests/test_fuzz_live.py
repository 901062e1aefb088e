"""A bounded live fuzz of a running loopback cluster: random and mutated frames on every bound socket, with
no key, a foreign key and a valid one. Afterwards every node is alive (or was restarted), the cluster
serves a request token-identical to the one before, and no process grew its memory beyond a bound.
The long run is benchmarks/fuzz_live.py (figures in benchmarks/RESULTS.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zmq

from sllm_eval.fuzz import rss_bytes, run_campaign
from sllm_actors.runtime.security import CLIENT, Credentials, add_key, keys_dir, load_credentials

PER_TARGET = int(os.environ.get("SLLM_LIVE_FUZZ_FRAMES", "1500"))
RSS_BOUND = 64 * 1024 * 1024
"""Growth allowed per process over the fuzz: logs, counters and allocator slack, nothing per frame kept."""
PROMPT = "The capital of France is"


def fuzz_keys(tmp: Path) -> dict[str, Credentials | None]:
    if not (keys_dir() / "clients" / "fuzz.key_secret").exists():
        add_key(keys_dir(), CLIENT, "fuzz")
    public, secret = zmq.curve_keypair()
    ring_server = load_credentials(keys_dir() / "operator.key_secret").server_public
    foreign = Credentials(public, secret, ring_server, CLIENT, "stranger", tmp / "none")
    return {
        "none": None,
        "foreign": foreign,
        "client": load_credentials(keys_dir() / "clients" / "fuzz.key_secret"),
        "node": load_credentials(keys_dir() / "nodes" / "node-2.key_secret"),
        "operator": load_credentials(keys_dir() / "operator.key_secret"),
    }


def test_live_fuzz_leaves_the_cluster_serving(cluster_factory: Any, tiny_model: Path, tmp_path: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, nodes=2)
    with cluster.client() as client:
        before = client.complete("tiny", PROMPT, max_tokens=16).token_ids
    pids = {"controller": cluster.proc.pid, **cluster.node_pids()}
    rss_before = {name: rss_bytes(pid) for name, pid in pids.items()}
    endpoints = {"clients": cluster.endpoint, "cluster": cluster.cluster_endpoint(), "state": cluster.state_endpoint}
    rows = run_campaign(endpoints, PER_TARGET, seed=14, keys=fuzz_keys(tmp_path), nodes=["node-1", "node-2"])
    assert sum(r["sent"] for r in rows if r["key"] in ("client", "node", "operator")) >= PER_TARGET * 2
    # Frames with a valid key were read and answered where the protocol answers (bad frames on the client
    # socket always are); without a key nothing came back.
    assert next(r for r in rows if r["socket"] == "clients" and r["key"] == "client")["replies"] > 0
    assert all(r["replies"] == 0 for r in rows if r["key"] in ("none", "foreign"))
    assert all(r["sent"] == 0 for r in rows if r["key"] == "foreign" and r["socket"] != "state"), rows
    assert all(r["sent"] > 0 for r in rows if r["key"] == "none")
    with cluster.client() as client:
        after = client.complete("tiny", PROMPT, max_tokens=16).token_ids
        status = client.status()
    assert after == before
    assert all(n["alive"] for n in status["nodes"]), status["nodes"]
    pids_after = {"controller": cluster.proc.pid, **{n["name"]: n["pid"] for n in status["nodes"]}}
    for name, pid in pids_after.items():
        if pids.get(name) == pid:  # a restarted node starts afresh: nothing to compare
            grown = rss_bytes(pid) - rss_before[name]
            assert grown < RSS_BOUND, f"{name} grew by {grown / 2**20:.1f} MiB over the fuzz"
    log = "".join(cluster.lines)
    assert "failed the CURVE handshake" in log and "unknown key" in log
