"""The replay driver against a real cluster, its summary and plot, and the model family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sllm_eval.replay import (
    PromptMaker,
    ReplayRecords,
    RequestRecord,
    family_shape,
    make_model_family,
    plot,
    replay,
    summarize,
    warm_up,
)
from sllm_eval.workload import Arrival, gamma_workload

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sllm_eval.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("replay-models")
    return {
        "tiny-a": make_tiny_model(root / "tiny-a", arch="llama", seed=0),
        "tiny-b": make_tiny_model(root / "tiny-b", arch="llama", seed=1, hidden_size=96),
    }


def test_replay_against_a_cluster(cluster_factory: Any, two_tiny: dict[str, Path], tmp_path: Path) -> None:
    cluster = cluster_factory({**two_tiny, "warm": two_tiny["tiny-a"]}, keep_alive="3s", memory="64MiB")
    # Warm-up: one long request on some node, migrated to the other; both nodes have loaded a model.
    assert sorted(warm_up(cluster.endpoint, "warm", max_tokens=4000, timeout_s=60)) == ["node-1", "node-2"]
    workload = gamma_workload(list(two_tiny), rps=0.8, cv=2.0, duration_s=20, seed=3, prompt_tokens=(8, 24),
                              output_tokens=(4, 8))
    # One request for a model the cluster does not have: it must come back as a clear error.
    workload.append(Arrival(5.0, "no-such-model", 8, 4))
    workload.sort(key=lambda a: a.time_s)
    assert len(workload) >= 8

    records = replay(cluster.endpoint, workload, concurrency_limit=8, timeout_s=60, label="test")

    assert isinstance(records, ReplayRecords)
    assert len(records) == len(workload)
    assert [r.arrival_s for r in records] == sorted(a.time_s for a in workload)
    for r in records:
        assert r.latency_s is not None and r.latency_s >= 0, r
        if r.model == "no-such-model":
            assert r.error_code == "unknown_model" and "no-such-model" in r.error_message, r
            continue
        assert r.ok, f"request {r.index} for {r.model} failed: {r.error_code} {r.error_message}"
        assert r.tokens == r.output_tokens, r  # random weights rarely hit the end token
        assert r.ttft_s is not None and 0 < r.ttft_s <= r.latency_s
        assert r.request_id
    # The run's events were collected: every model that served a request was loaded at least once.
    loads = [e for e in records.events if e["kind"] == "load"]
    assert {e["data"]["model"] for e in loads} >= {r.model for r in records if r.ok}
    assert all(e["data"]["tier"] in ("dram", "ssd", "repository") for e in loads)

    s = summarize(records)
    assert s["requests"] == len(workload)
    assert s["completed"] == len(workload) - 1
    assert s["errors"] == {"unknown_model": 1} and "no-such-model" in s["error_examples"]["unknown_model"]
    for key in ("latency_s", "ttft_s"):
        st = s[key]
        assert 0 < st["p50"] <= st["p99"] <= st["max"], st
        assert st["mean"] > 0
    assert s["cold_starts"]["total"] == len(loads) >= 2
    assert sum(int(t["count"]) for t in s["cold_starts"]["by_tier"].values()) == len(loads)
    assert s["migrations"]["requests_migrated"] == sum(1 for r in records if r.migrations)
    # Sampled from half-second snapshots: tiny requests may all fall between two of them.
    assert all(g in ("node-1/gpu-0", "node-2/gpu-0") and 0 <= v <= s["duration_s"] + 1
               for g, v in s["gpu_busy_s"].items())
    assert s["duration_s"] >= max(a.time_s for a in workload)
    json.dumps(s)  # the summary is plain data

    png = plot({"test": records, "again": records}, tmp_path / "out" / "replay.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_summarize_and_plot_without_a_cluster(tmp_path: Path) -> None:
    records = ReplayRecords([
        RequestRecord(0, "m", 0.0, 16, 8, ttft_s=0.5, latency_s=1.0, tokens=8),
        RequestRecord(1, "m", 1.0, 16, 8, ttft_s=1.5, latency_s=3.0, tokens=8,
                      migrations=[{"kind": "migration", "from": "a", "to": "b"}]),
        RequestRecord(2, "m", 2.0, 16, 8, latency_s=0.1, error_code="no_capacity", error_message="busy"),
    ])
    records.events = [
        {"time": 1.0, "kind": "schedule", "text": "p: load m", "data": {"model": "m", "decision": "load",
                                                                         "estimate_s": 2.0}},
        {"time": 1.5, "kind": "schedule", "text": "p: preempt m", "data": {"model": "m", "decision": "preempt"}},
        {"time": 2.0, "kind": "load", "text": "m loaded", "data": {"model": "m", "node": "n1", "tier": "ssd",
                                                                   "seconds": 2.5}},
        {"time": 3.0, "kind": "load", "text": "m loaded", "data": {"model": "m", "node": "n2", "tier": "dram",
                                                                   "seconds": 0.5}},
        {"time": 2.1, "kind": "estimate", "text": "load of m", "data": {"model": "m", "tier": "ssd",
                                                                        "estimate_s": 2.0, "measured_s": 2.5}},
        {"time": 4.0, "kind": "migrate", "text": "migrate r a -> b (x)", "data": {}},
        {"time": 4.9, "kind": "migrate", "text": "r migrated to b/i-2 after 1 round(s)", "data": {}},
        {"time": 5.0, "kind": "migrate", "text": "migration mig-1 done in 0.2s", "data": {}},
    ]
    records.duration_s = 10.0
    records.busy_s = {"n1/gpu-0": 4.0}
    s = summarize(records)
    assert (s["requests"], s["completed"], s["errors"]) == (3, 2, {"no_capacity": 1})
    assert s["latency_s"]["p50"] == pytest.approx(2.0) and s["latency_s"]["max"] == 3.0
    assert s["cold_starts"]["by_tier"]["ssd"]["count"] == 1 and s["cold_starts"]["by_tier"]["dram"]["mean_s"] == 0.5
    assert s["migrations"] == {"requests_migrated": 1, "records_by_kind": {"migration": 1}, "ordered": 1,
                               "outcomes": {"done": 1}}
    assert s["decisions"] == {"load": 1, "preempt": 1} and s["preemptions"] == 1
    assert s["estimator"]["count"] == 1 and s["estimator"]["mean_abs_error_s"] == pytest.approx(0.5)
    assert s["estimator"]["by_tier"]["ssd"]["mean_rel_error"] == pytest.approx(-0.2)
    assert s["gpu_busy_fraction"] == {"n1/gpu-0": 0.4}
    assert plot({"p": records}, tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_model_family_sizes_and_cache(tmp_path: Path, two_tiny: dict[str, Path]) -> None:
    base = json.loads((two_tiny["tiny-a"] / "config.json").read_text())
    small, large = family_shape(4, base), family_shape(40, base)
    assert small["hidden_size"] <= large["hidden_size"] and small["num_hidden_layers"] >= 2

    family = make_model_family(tmp_path / "fam", [4, 12], seed=1, base_model=two_tiny["tiny-a"])
    assert [m.name for m in family] == ["llama-4mb-s1", "llama-12mb-s1"]
    for m, want in zip(family, (4e6, 12e6)):
        assert 0.7 * want < m.bytes < 1.3 * want, (m, want)
        assert (m.path / "index.json").is_file() and (m.path / "tokenizer.json").is_file()
    stamp = (family[0].path / "index.json").stat().st_mtime_ns
    again = make_model_family(tmp_path / "fam", [4, 12], seed=1, base_model=two_tiny["tiny-a"])
    assert again == family and (family[0].path / "index.json").stat().st_mtime_ns == stamp  # cached

    from transformers import AutoTokenizer

    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(family[0].path, "cpu")
    assert model.config.vocab_size == base["vocab_size"]
    assert tokenizer.encode("hello world") == AutoTokenizer.from_pretrained(two_tiny["tiny-a"]).encode("hello world")


def test_prompt_maker_lengths(two_tiny: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(two_tiny["tiny-a"])
    make = PromptMaker(tok)
    for n in (8, 40):
        ids = tok.encode(make(n, salt=n), add_special_tokens=False)
        assert abs(len(ids) - n) <= 2, (n, len(ids))
    assert len(PromptMaker()(20).split()) == 20


def test_seed_ssd_tiers_spreads_copies_round_robin(tmp_path: Path) -> None:
    from sllm_eval.replay import FamilyModel, seed_ssd_tiers

    family = []
    for name in ("m-a", "m-b", "m-c"):
        src = tmp_path / "family" / name
        (src / "sub").mkdir(parents=True)
        (src / "config.json").write_text("{}")
        (src / "sub" / "data_0.bin").write_bytes(name.encode() * 100)
        family.append(FamilyModel(name, src, 1, 300, 8, 1))
    work = tmp_path / "work"
    placed = seed_ssd_tiers(work, family, nodes=2, replicas=1)
    assert placed == {"m-a": ["node-1"], "m-b": ["node-2"], "m-c": ["node-1"]}
    assert (work / "ssd-2" / "m-b" / "sub" / "data_0.bin").read_bytes() == b"m-b" * 100
    assert not (work / "ssd-2" / "m-a").exists()
    both = seed_ssd_tiers(tmp_path / "work2", family, nodes=2, replicas=5)
    assert all(sorted(nodes) == ["node-1", "node-2"] for nodes in both.values())


def test_merge_reports_of_separate_runs(tmp_path: Path) -> None:
    import json
    from dataclasses import asdict

    from sllm_eval.replay import merge_reports

    def run_file(name: str, policy: str, latencies: list[float], arrivals: list[float]) -> Path:
        recs = ReplayRecords(RequestRecord(i, "m", a, 16, 8, ttft_s=lat / 2, latency_s=lat, tokens=8)
                             for i, (a, lat) in enumerate(zip(arrivals, latencies, strict=True)))
        recs.duration_s = 10.0
        path = tmp_path / name
        path.write_text(json.dumps({"args": {"device": "cuda"}, "summaries": {policy: summarize(recs)},
                                    "records": {policy: [asdict(r) for r in recs]}, "events": {policy: []}}))
        return path

    a = run_file("a.json", "serverlessllm", [1.0, 2.0], [0.0, 1.0])
    b = run_file("b.json", "random", [4.0, 8.0], [0.0, 1.0])
    merged = merge_reports([a, b], json_out=str(tmp_path / "all.json"), png_out=str(tmp_path / "all.png"))
    assert set(merged["summaries"]) == {"serverlessllm", "random"}
    assert json.loads((tmp_path / "all.json").read_text())["merged_from"] == [str(a), str(b)]
    assert (tmp_path / "all.png").read_bytes()[:8] == PNG_MAGIC
    other = run_file("c.json", "shepherd", [1.0, 2.0], [0.0, 1.5])
    with pytest.raises(ValueError, match="another workload"):
        merge_reports([a, other])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a replay JSON"):
        merge_reports([tmp_path / "bad.json"])


def test_model_family_writes_the_baselines_copy_alongside(tmp_path: Path, two_tiny: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import load_file

    from sllm_actors.storage import load_model

    family = make_model_family(tmp_path / "fam", [4], seed=2, base_model=two_tiny["tiny-a"],
                               safetensors_dir=tmp_path / "hf")
    copy = tmp_path / "hf" / family[0].name
    assert (copy / "tokenizer.json").is_file() and (copy / "config.json").is_file()
    theirs = load_file(copy / "model.safetensors")
    ours = load_model(family[0].path, "cpu").state_dict()
    assert set(theirs) <= set(ours) and len(theirs) > 3
    for name, tensor in theirs.items():
        assert torch.equal(tensor, ours[name]), name  # the same weights in both formats


def test_bench_topology_takes_stated_sizes(tmp_path: Path) -> None:
    import yaml

    from sllm_eval.replay import FamilyModel, write_bench_topology

    family = [FamilyModel(f"m{i}", tmp_path / f"m{i}", 400, 400_000_000, 8, 1) for i in range(6)]
    derived = yaml.safe_load(write_bench_topology(tmp_path / "a.yaml", family, policy="serverlessllm").read_text())
    assert derived["nodes"][0]["gpus"][0]["memory"] > 800_000_000  # room for the two largest, by default
    stated = yaml.safe_load(write_bench_topology(
        tmp_path / "b.yaml", family, policy="random", nodes=2, devices=[["cuda:0", "cuda:0"]] * 2,
        gpu_bytes=500_000_000, dram_bytes=900_000_000, ssd_bytes=1_200_000_000).read_text())
    for node in stated["nodes"]:
        assert [g["memory"] for g in node["gpus"]] == [500_000_000, 500_000_000]
        assert node["dram"]["capacity"] == 900_000_000 and node["ssd"]["capacity"] == 1_200_000_000
