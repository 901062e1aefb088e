"""The soak and chaos benchmark's short CPU run (benchmarks/bench_soak.py; its load is sllm_eval/soak.py): a
two-node cluster serving a tiny deterministic model over HTTP, a handful of greedy streams back to back, and a
process SIGKILLed mid-run.

- A node killed: every request completes (none failed or cut), each stream token-identical to its prompt's
  reference run, and the counts add up.
- The HTTP front end killed: the streams through it are cut (counted apart), the cluster cancels their requests
  (none left running), ``sllm up`` restarts the front end, and the requests after it succeed.

Counts and completions only: throughput on a shared CPU says nothing, and is never asserted."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from sllm_eval.soak import Kill, SoakConfig, parse_kills, run_soak, summarize

from .conftest import RunningCluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_endpoint(cluster: RunningCluster) -> str:
    words = next(ln for ln in cluster.lines if ln.startswith("ready:")).split()
    return words[words.index("http") + 2]


def soak_cluster(cluster_factory: Any, tiny_model: Path) -> RunningCluster:
    # deterministic: true keeps batch composition out of a greedy result, so a stream resumed on another
    # instance (with other requests beside it) must still give exactly its reference tokens.
    return cluster_factory({}, nodes=2, extra={
        "controller": {"http_port": free_port()},
        "scheduler": {"migration_transfer": "recompute"},
        "models": [{"name": "tiny", "source": str(tiny_model), "keep_alive": "5m", "deterministic": True,
                    "target_concurrency": 2}],
    })


def soak(cluster: RunningCluster, streams: int, duration_s: float, max_tokens: int,
         kills: list[Kill]) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = SoakConfig(url=http_endpoint(cluster), model="tiny", streams=streams, duration_s=duration_s,
                     max_tokens=max_tokens, kills=kills, up_pid=cluster.proc.pid, client_endpoint=cluster.endpoint,
                     drain_s=90)
    raw = asyncio.run(run_soak(cfg, say=print))
    return raw, summarize(raw)


def check_counts(raw: dict[str, Any], s: dict[str, Any]) -> None:
    assert s["requests"] == len(raw["outcomes"]) == s["finished"] + s["failed"] + s["cut"] + s["unfinished"]
    # Every token counted over time belongs to exactly one request's stream.
    assert s["tokens"] == sum(o["tokens"] for o in raw["outcomes"]) > 0
    assert all(o["tokens"] == len(o["token_ids"]) for o in raw["outcomes"])
    assert s["exactness"]["checked"] == s["finished"], "every finished stream was checked"
    assert s["exactness"]["mismatched"] == 0, s["exactness"]
    assert raw["left_running"] == [], "the cluster still runs requests no stream waits for"


def test_kills_parse_and_the_summary_adds_up() -> None:
    assert parse_kills("http@120, node-1@60,controller@200.5") == [
        Kill("node-1", 60), Kill("http", 120), Kill("controller", 200.5)]
    for bad in ("node-1", "@60", "http@soon"):
        with pytest.raises(ValueError, match="--kill"):
            parse_kills(bad)

    def outcome(status: str, prompt: int, ids: list[int], why: str = "", headers: bool = True) -> dict[str, Any]:
        return {"worker": 0, "prompt": prompt, "started_s": 1.0, "ended_s": 2.0, "status": status, "why": why,
                "request_id": f"r{prompt}", "headers": headers, "finish_reason": "length", "tokens": len(ids),
                "token_ids": ids}

    # 100 tok/s for 30 s, nothing for 5 s after a kill, then 95 tok/s: back to 90 % from 5 s on.
    raw = {"reference": {"0": [1, 2], "1": [3, 4]}, "wall_s": 50.0, "left_running": [],
           "tokens_by_s": [100] * 30 + [0] * 5 + [95] * 15,
           "outcomes": [outcome("finished", 0, [1, 2]), outcome("finished", 1, [3, 5]),
                        outcome("cut", 0, [1], "stream lost"), outcome("cut", 1, [], "connection lost", False),
                        outcome("failed", 0, [], "HTTP 503: x")],
           "kills": [{"target": "node", "at_s": 30, "t_s": 30.0, "role": "node-1", "pid": 1}],
           "rss": [(0.0, "node-1", 1, 100 << 20), (25.0, "node-1", 1, 110 << 20), (32.0, "node-1", 2, 50 << 20)]}
    s = summarize(raw)
    assert (s["requests"], s["finished"], s["failed"], s["cut"], s["cut_mid_stream"]) == (5, 2, 1, 2, 1)
    assert s["why"] == {"cut: stream lost": 1, "cut: connection lost": 1, "failed: HTTP 503: x": 1}
    assert s["exactness"]["checked"] == 2 and s["exactness"]["mismatched"] == 1
    assert s["exactness"]["examples"][0]["first_difference"] == 1
    assert s["tokens_per_10s"] == [1000, 1000, 1000, 475, 950]
    assert s["kills"][0]["tok_s_before"] == 100 and s["kills"][0]["back_to_90pct_after_s"] == 5
    assert s["memory"]["node-1 (pid 1)"]["settled_max_mib"] == 110 and "node-1 (pid 2)" in s["memory"]


def test_memory_slopes_tell_a_leak_from_a_cache_that_filled_and_the_victim_is_the_busiest_node() -> None:
    from sllm_eval.soak import busiest_node

    mib = 2**20
    # A leak: +1 MiB every 10 s to the end. A cache: +1 MiB every 10 s for a minute, then flat.
    leak = [(float(t), "node-1", 1, (100 + t // 10) * mib) for t in range(0, 200, 10)]
    cache = [(float(t), "node-2", 2, (100 + min(t, 80) // 10) * mib) for t in range(0, 200, 10)]
    # node-1's growth is its anonymous memory (its heap), its mapped files stay as they were.
    parts = [(t, role, pid, {"RssAnon": v - 50 * mib, "RssFile": 50 * mib, "RssShmem": 0})
             for t, role, pid, v in leak]
    raw = {"reference": {}, "wall_s": 200.0, "left_running": [], "tokens_by_s": [1] * 200, "outcomes": [],
           "kills": [], "rss": leak + cache, "rss_parts": parts,
           "gpus": [(0.0, "node-1", 0, 0, 1), (100.0, "node-1", 0, 7, 1)]}
    memory = summarize(raw)["memory"]
    assert memory["node-1 (pid 1)"]["late_slope_by_part_mib_per_min"] == {"RssAnon": 6.0, "RssFile": 0.0,
                                                                         "RssShmem": 0.0}
    assert memory["node-2 (pid 2)"]["late_slope_by_part_mib_per_min"] == {}
    assert memory["node-1 (pid 1)"]["settled_slope_mib_per_min"] == 6.0
    assert memory["node-1 (pid 1)"]["late_slope_mib_per_min"] == 6.0
    assert memory["node-2 (pid 2)"]["late_slope_mib_per_min"] == 0.0
    assert 0 < memory["node-2 (pid 2)"]["settled_slope_mib_per_min"] < 6.0
    assert summarize(raw)["cuda_graphs"]["node-1/gpu-0"] == {"first": 0, "last": 7, "max": 7,
                                                             "series": [(0.0, 0), (100.0, 7)]}
    requests = [{"node": "node-2"}, {"node": "node-1"}, {"node": "node-2"}, {"node": ""}]
    assert busiest_node(requests) == ("node-2", 2)
    assert busiest_node([{"node": "", "state": "placing"}]) == ("", 0), "a request not yet placed runs nowhere"


def test_a_node_killed_under_load_loses_no_request(cluster_factory: Any, tiny_model: Path) -> None:
    cluster = soak_cluster(cluster_factory, tiny_model)
    raw, s = soak(cluster, streams=6, duration_s=35, max_tokens=64, kills=[Kill("node", 12)])
    check_counts(raw, s)
    assert s["failed"] == s["cut"] == s["unfinished"] == 0, s["why"]
    assert s["finished"] >= 6, "each stream completed requests"
    kill = s["kills"][0]
    assert "error" not in kill and kill["role"].startswith("node-") and kill["new_pid"] != kill["pid"], kill
    assert kill["requests_on_victim"] >= 1, kill
    # The kill hit streams (the node ran the most requests then), and they went on from their token logs.
    metrics = httpx.get(f"{http_endpoint(cluster)}/metrics", timeout=30).text
    resumes = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("sllm_request_migrations_total{") and 'kind="resume"' in line)
    assert resumes >= 1, metrics


def test_a_killed_http_front_end_cuts_its_streams_and_cancels_their_requests(cluster_factory: Any,
                                                                              tiny_model: Path) -> None:
    cluster = soak_cluster(cluster_factory, tiny_model)
    # Long requests: the ones in flight at the kill are far from their end, so each one the cluster let go
    # was cancelled, not finished.
    raw, s = soak(cluster, streams=4, duration_s=30, max_tokens=600, kills=[Kill("http", 10)])
    check_counts(raw, s)
    assert s["failed"] == s["unfinished"] == 0, s["why"]
    kill = s["kills"][0]
    assert "error" not in kill and kill["new_pid"] != kill["pid"], "sllm up restarted the front end"
    # The streams in flight at the kill were cut, counted apart from failures: mid-way, each with its id (the
    # first event carries it), or, a request the front end had taken but not yet answered, before its headers.
    assert s["cut_mid_stream"] >= 1 and len(kill["cut_requests"]) == s["cut_mid_stream"], (s["why"], kill)
    assert all("lost" in o["why"] or "without [DONE]" in o["why"] for o in raw["outcomes"] if o["status"] == "cut")
    assert "cut_still_running" not in kill, kill
    log = "".join(cluster.lines)
    for request_id in kill["cut_requests"]:
        assert f"client of {request_id} is gone; cancelling it" in log, request_id
    after = [o for o in raw["outcomes"] if o["started_s"] > kill["t_s"]]
    assert after and all(o["status"] == "finished" for o in after), "requests after the restart succeed"


def test_a_node_then_the_controller_killed_under_load_lose_no_request(cluster_factory: Any, tiny_model: Path) -> None:
    """Issue 21's CI run: a node SIGKILLed, later the controller; every stream completes token-identical (none
    failed or cut), the nodes re-registered with the restarted controller and the streams went on."""
    cluster = soak_cluster(cluster_factory, tiny_model)
    raw, s = soak(cluster, streams=4, duration_s=45, max_tokens=64, kills=[Kill("node", 10), Kill("controller", 28)])
    check_counts(raw, s)
    assert s["failed"] == s["cut"] == s["unfinished"] == 0, s["why"]
    node_kill, controller_kill = s["kills"]
    assert "error" not in node_kill and node_kill["new_pid"] != node_kill["pid"], node_kill
    assert "error" not in controller_kill and controller_kill["role"] == "controller", controller_kill
    assert controller_kill["new_pid"] != controller_kill["pid"], "sllm up restarted the controller"
    log = "".join(cluster.lines)
    assert "controller restarted: epoch 2" in log and "re-registered with controller epoch 2" in log
    after = [o for o in raw["outcomes"] if o["started_s"] > controller_kill["t_s"]]
    assert after and all(o["status"] == "finished" for o in after), "requests after the restart succeed"
