"""The paper's baselines as load modes of a real cluster (``scheduler.load_mode``): each cold start goes their
way (a download of the safetensors checkpoint, then ``from_pretrained``), and their copies are deleted or kept
as each mode says; plus the pure parts (the disk cache's LRU, the paced copy, the topology's validation)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.actors.node.baseline_loader import CopyCache, baseline_dir, paced_copy
from sllm_actors.runtime.topology import TopologyError, parse_topology


def _complete(client: Any, model: str, prompt: str) -> Any:
    from sllm_actors.client import Completion

    for event in client.generate(model, prompt, max_tokens=4, temperature=0):
        if isinstance(event, Completion):
            return event
    raise AssertionError("the stream ended without a completion")


def _wait_unloaded(cluster: Any, model: str) -> None:
    cluster.wait_for(lambda st: not any(i["model"] == model for i in st["instances"]), 60,
                     f"{model} unloaded after its keep-alive")


def _wait_path(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)  # polling a condition with a deadline, not waiting a fixed time


def _topology_extra(mode: str) -> dict[str, Any]:
    return {"scheduler": {"policy": "availability", "load_mode": mode}}


def test_rayserve_downloads_loads_with_from_pretrained_and_deletes_at_unload(
        cluster_factory: Any, tiny_model: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, nodes=1, keep_alive="1s", extra=_topology_extra("rayserve"),
                              repository_bandwidth="200MB")
    copies = baseline_dir(cluster.topology.parent / "ssd-1", "rayserve")
    with cluster.client(idle_timeout=120) as c:
        done = _complete(c, "tiny", "hello world")
        assert len(done.token_ids) == 4
        parts = done.cold_start["parts"]
        assert done.cold_start["tier"] == "repository", done.cold_start
        assert parts["download"] > 0 and parts["from_pretrained"] > 0, parts
        assert "read" not in parts and "process_start" not in parts, parts  # not our loader, not KServe's start
        # While the instance lives, its copy is on the node's disk (safetensors, as downloaded).
        held = [p for p in copies.iterdir() if p.name.startswith("tiny.")]
        assert len(held) == 1 and (held[0] / "model.safetensors").is_file(), held
        loads = [e for e in c.status().get("events", []) if e["kind"] == "load"]
    assert loads and loads[-1]["data"]["load_mode"] == "rayserve", loads
    _wait_unloaded(cluster, "tiny")
    _wait_path(lambda: not any(copies.iterdir()), 30, "the rayserve copy deleted at unload")
    # Nothing went through our tiers: no SSD copy in our format, and the next start downloads again.
    assert not (cluster.topology.parent / "ssd-1" / "tiny").exists()
    with cluster.client(idle_timeout=120) as c:
        again = _complete(c, "tiny", "hello world")
    assert again.token_ids == done.token_ids
    assert again.cold_start["tier"] == "repository" and again.cold_start["parts"]["download"] > 0


def test_rayserve_cache_keeps_the_copy_and_loads_it_again(cluster_factory: Any, tiny_model: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, nodes=1, keep_alive="1s", extra=_topology_extra("rayserve-cache"))
    copy = baseline_dir(cluster.topology.parent / "ssd-1", "rayserve-cache") / "tiny"
    with cluster.client(idle_timeout=120) as c:
        first = _complete(c, "tiny", "hello world")
    assert first.cold_start["tier"] == "repository" and first.cold_start["parts"]["download"] > 0
    _wait_unloaded(cluster, "tiny")
    assert (copy / "model.safetensors").is_file(), "the cached copy was deleted at unload"
    with cluster.client(idle_timeout=120) as c:
        second = _complete(c, "tiny", "hello world")
    assert second.token_ids == first.token_ids
    assert second.cold_start["tier"] == "ssd", second.cold_start
    assert "download" not in second.cold_start["parts"] and second.cold_start["parts"]["from_pretrained"] > 0


def test_kserve_starts_a_fresh_server_process(cluster_factory: Any, tiny_model: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, nodes=1, keep_alive="1s", extra=_topology_extra("kserve"))
    copies = baseline_dir(cluster.topology.parent / "ssd-1", "kserve")
    with cluster.client(idle_timeout=120) as c:
        done = _complete(c, "tiny", "hello world")
    parts = done.cold_start["parts"]
    assert parts["download"] > 0 and parts["process_start"] > 0 and parts["from_pretrained"] > 0, parts
    _wait_unloaded(cluster, "tiny")
    _wait_path(lambda: not any(copies.iterdir()), 30, "the kserve copy deleted at unload")


def test_a_baseline_replays_end_to_end(cluster_factory: Any, tiny_model: Path) -> None:
    from sllm_eval.replay import replay, summarize
    from sllm_eval.workload import gamma_workload

    cluster = cluster_factory({"tiny": tiny_model}, nodes=2, keep_alive="1s", extra=_topology_extra("rayserve"))
    workload = gamma_workload(["tiny"], rps=1.0, cv=2.0, duration_s=6, seed=1, prompt_tokens=(4, 8),
                              output_tokens=(2, 4))
    records = replay(cluster.endpoint, workload, concurrency_limit=4, timeout_s=60, label="rayserve")
    assert records and all(r.ok for r in records), [(r.error_code, r.error_message) for r in records if not r.ok]
    loads = [e for e in records.events if e["kind"] == "load"]
    assert loads and all(e["data"]["load_mode"] == "rayserve" and "download" in e["data"]["parts"] for e in loads)
    assert summarize(records)["cold_starts"]["by_tier"]["repository"]["count"] == len(loads)


# ---------------------------------------------------------------------------------------------- pure parts


def test_copy_cache_is_lru_and_never_evicts_a_leased_copy() -> None:
    cache = CopyCache(100)
    cache.add("a", 40)
    cache.release("a")
    cache.add("b", 40)
    cache.release("b")
    assert cache.hit("a")  # a is now the most recent, and leased
    assert cache.room_for(20) == []
    assert cache.room_for(50) == ["b"]  # a is leased: b goes though a is older
    cache.release("a")
    assert cache.room_for(50) == ["b"]  # b is the least recent now
    assert cache.room_for(100) == ["b", "a"]
    assert cache.room_for(101) is None
    cache.hit("b")
    assert cache.room_for(61) is None  # only a may go, and that leaves 60


def test_paced_copy_copies_every_byte(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (src / "sub" / "config.json").write_text("{}")
    n = paced_copy(src, tmp_path / "dest", limit=None)
    assert n == 256 * 4096 + 2
    assert (tmp_path / "dest" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (tmp_path / "dest" / "sub" / "config.json").read_text() == "{}"
    assert {p.name for p in tmp_path.iterdir()} == {"src", "dest"}  # no partial copy left beside it


def test_topology_validates_the_load_mode(tmp_path: Path) -> None:
    base = {"nodes": [{"name": "n1", "gpus": [{"device": "cpu"}]}]}
    topo = parse_topology({**base, "scheduler": {"load_mode": "rayserve-cache"}}, tmp_path / "t.yaml")
    assert topo.scheduler.load_mode == "rayserve-cache"
    assert [n.load_mode for n in topo.nodes] == ["rayserve-cache"]  # what each node is sent
    assert parse_topology(base, tmp_path / "t.yaml").nodes[0].load_mode == "serverlessllm"
    with pytest.raises(TopologyError, match=r"scheduler\.load_mode: unknown load mode 'ray' \(choose from "
                                            r"serverlessllm, rayserve, rayserve-cache, kserve\)"):
        parse_topology({**base, "scheduler": {"load_mode": "ray"}}, tmp_path / "t.yaml")


def test_runs_split_over_files_merge_into_a_paired_comparison(tmp_path: Path) -> None:
    """A comparison split over calls (one file per seed and policy set) merges into one paired report."""
    import json
    from dataclasses import asdict

    from sllm_eval.replay import ReplayRecords, RequestRecord, merge_reports, summarize

    def run_file(name: str, seed: int, latencies: dict[str, list[float]]) -> Path:
        runs = {}
        for policy, values in latencies.items():
            recs = ReplayRecords(RequestRecord(i, "m", float(i), 16, 8, ttft_s=v / 2, latency_s=v, tokens=8)
                                 for i, v in enumerate(values))
            recs.duration_s = 10.0
            runs[policy] = recs
        path = tmp_path / name
        path.write_text(json.dumps({
            "args": {"seed": 0}, "seeds": [seed], "summaries": {p: summarize(r) for p, r in runs.items()},
            "records": {p: [asdict(x) for x in r] for p, r in runs.items()}, "events": {p: [] for p in runs}}))
        return path

    files = [run_file("s0.json", 0, {"serverlessllm": [1.0, 2.0], "rayserve": [3.0, 8.0]}),
             run_file("s1.json", 1, {"serverlessllm": [2.0, 2.0]}),
             run_file("s1-ray.json", 1, {"rayserve": [4.0, 6.0]})]
    merged = merge_reports(files, json_out=str(tmp_path / "all.json"), png_out=str(tmp_path / "all.png"),
                           resamples=20)
    assert merged["seeds"] == [0, 1] and set(merged["runs"]) == {"0", "1"}
    p99 = merged["paired"]["ratios"]["rayserve"]["latency"]["p99"]
    assert p99["per_seed"][0] == pytest.approx(7.95 / 1.99) and p99["per_seed"][1] == pytest.approx(5.98 / 2.0)
    assert p99["base_wins"] and p99["seeds"] == 2
    assert (tmp_path / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "all.json").read_text())["paired"]["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="another workload than the first file's for seed 1"):
        merge_reports([files[1], run_file("bad.json", 1, {"random": [1.0, 2.0, 3.0]})])
