"""The discrete-event simulator: invariants, determinism, exact costs, and constructed situations
whose policy outcome is clear (it runs the scheduler's own ``placement.choose``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from sllm_eval.simulator import (
    POLICIES,
    ModelConfig,
    ServerConfig,
    SimConfig,
    apply_calibration,
    load_calibration,
    main,
    simulate,
)
from sllm_eval.workload import Arrival, gamma_workload

GB = 1_000_000_000
BW = {"dram": 10 * GB, "ssd": 1 * GB, "repository": 0.1 * GB}


def _model(name: str, size: float, **kw: object) -> ModelConfig:
    base: dict[str, object] = {"prefill_s_per_token": 0.001, "decode_s_per_token": 0.01, "migration_a": 0.0005,
                               "migration_b": 0.05, "keep_alive_s": 1000.0}
    base.update(kw)
    return ModelConfig(name, int(size * GB), **base)  # type: ignore[arg-type]


def _server(name: str, gpu_gb: float = 8, gpus: int = 1, dram_gb: float = 64, ssd_gb: float = 500) -> ServerConfig:
    return ServerConfig(name, [int(gpu_gb * GB)] * gpus, int(dram_gb * GB), int(ssd_gb * GB), dict(BW))


def _by_model(result, model: str):
    return next(r for r in result.requests if r.model == model)


# ---------------------------------------------------------------------------------------------- costs


def test_a_cold_start_costs_the_load_then_prefill_then_decode() -> None:
    cfg = SimConfig([_server("s")], [_model("m", 2)], initial_ssd={"m": ["s"]})
    res = simulate(cfg, [Arrival(0.0, "m", 100, 50), Arrival(100.0, "m", 100, 50)], "serverlessllm")
    cold, warm = res.requests
    assert cold.cold_tier == "ssd" and warm.cold_tier == ""
    assert cold.ttft_s == pytest.approx(2.0 + 0.1)  # 2 GB at 1 GB/s, then 100 prompt tokens
    assert cold.latency_s == pytest.approx(2.0 + 0.1 + 49 * 0.01)
    assert warm.latency_s == pytest.approx(0.1 + 49 * 0.01)
    assert res.loads == {"dram": 0, "ssd": 1, "repository": 0}


def test_loads_fill_the_tiers_and_dram_evicts_least_recently_used() -> None:
    # DRAM holds one of the two 2 GB models; nothing is on SSD at first; keep-alive 1 s.
    cfg = SimConfig([_server("s", dram_gb=3)], [_model("a", 2, keep_alive_s=1), _model("b", 2, keep_alive_s=1)],
                    initial_ssd={})
    work = [Arrival(0, "a", 10, 2), Arrival(100, "a", 10, 2), Arrival(200, "b", 10, 2), Arrival(300, "a", 10, 2)]
    res = simulate(cfg, work, "serverlessllm")
    assert [r.cold_tier for r in res.requests] == ["repository", "dram", "repository", "ssd"]
    assert res.requests[0].ttft_s == pytest.approx(20 + 0.01)  # 2 GB from the repository at 0.1 GB/s


def test_requests_on_one_instance_share_it_when_batching_is_not_free() -> None:
    work = [Arrival(0, "m", 100, 101), Arrival(0, "m", 100, 101)]
    cfg = SimConfig([_server("s")], [_model("m", 1)], initial_instances=[("m", "s")])
    alone = simulate(cfg, work[:1], "serverlessllm").requests[0].latency_s
    assert alone == pytest.approx(0.1 + 100 * 0.01)
    batched = simulate(cfg, work, "serverlessllm").requests
    assert [r.latency_s for r in batched] == pytest.approx([alone, alone])
    cfg.batch_sharing = 1.0
    shared = simulate(cfg, work, "serverlessllm").requests
    assert [r.latency_s for r in shared] == pytest.approx([2 * alone, 2 * alone])


def test_a_model_over_its_instance_limit_queues_until_a_slot_frees() -> None:
    cfg = SimConfig([_server("s", gpus=2)], [_model("m", 1, max_concurrency=1, max_instances=1)],
                    initial_instances=[("m", "s")])
    a, b = simulate(cfg, [Arrival(0, "m", 100, 101), Arrival(0, "m", 100, 101)], "serverlessllm").requests
    assert a.latency_s == pytest.approx(1.1)
    assert b.latency_s == pytest.approx(2.2) and b.status == "done"


def test_no_room_anywhere_means_wait_then_fail_at_the_queue_timeout() -> None:
    cfg = SimConfig([_server("s", gpu_gb=4)], [_model("big", 6)], queue_timeout_s=30)
    for policy in POLICIES:
        (r,) = simulate(cfg, [Arrival(5.0, "big", 10, 10)], policy).requests
        assert r.status == "failed" and r.finish_s == pytest.approx(35.0)
        assert r.error.startswith("no_capacity") and r.ttft_s is None


# ---------------------------------------------------------------------------------------------- policies

def _busy_near_scenario() -> tuple[SimConfig, list[Arrival]]:
    """'near' holds m in DRAM but its one GPU runs a long request of a; 'far' is free, with a on its SSD
    and m nowhere: m from the repository there takes 60 s, from near's DRAM 0.6 s."""
    cfg = SimConfig(
        [_server("near"), _server("far")],
        [_model("a", 2), _model("m", 6)],
        initial_ssd={"a": ["near", "far"]},
        initial_dram={"m": ["near"]},
        initial_instances=[("a", "near")],
    )
    work = [Arrival(0.0, "a", 100, 1000), Arrival(1.0, "m", 100, 10)]
    return cfg, work


def test_serverlessllm_migrates_and_beats_locality_blind_policies_on_that_request() -> None:
    cfg, work = _busy_near_scenario()
    res = {p: simulate(cfg, work, p, seed=0) for p in POLICIES}
    sllm = res["serverlessllm"]
    assert sllm.decisions["migrate"] == 1 and sllm.migrations == 1
    a, m = _by_model(sllm, "a"), _by_model(sllm, "m")
    assert a.migrations == 1 and a.server == "far" and m.server == "near" and m.cold_tier == "dram"
    # m waits for a's destination (a from far's SSD, 2 s) and a's token recompute, then loads from DRAM.
    assert m.latency_s < 10
    for other in ("availability", "random", "locality-wait"):
        om = _by_model(res[other], "m")
        assert om.server == "far" and om.cold_tier == "repository"
        assert om.latency_s > 60 > 6 * m.latency_s
    # The migrated request lost nothing: it ends exactly when it would have undisturbed.
    assert a.latency_s == pytest.approx(_by_model(res["locality-wait"], "a").latency_s)


def test_shepherd_preempts_and_the_preempted_request_pays_for_it() -> None:
    cfg, work = _busy_near_scenario()
    shep = simulate(cfg, work, "shepherd")
    base = simulate(cfg, work, "locality-wait")
    assert shep.decisions["preempt"] == 1 and shep.preemptions == 1 and shep.migrations == 0
    a, m = _by_model(shep, "a"), _by_model(shep, "m")
    assert a.preemptions == 1 and a.server == "far"
    assert m.server == "near" and m.latency_s < 1.0  # the GPU is free at once
    # a restarts from scratch at t=1 on far after a 2 s load from SSD: all its progress is lost.
    undisturbed = _by_model(base, "a").latency_s
    assert a.latency_s == pytest.approx(1.0 + 2.0 + undisturbed)
    assert a.latency_s > undisturbed + 2.5


def test_a_costly_migration_loses_to_a_free_gpu_with_a_local_copy() -> None:
    cfg, work = _busy_near_scenario()
    cfg.initial_ssd = {"a": ["near", "far"], "m": ["far"]}  # m from far's SSD: 6 s
    for m in cfg.models:
        if m.name == "a":
            m.migration_a, m.migration_b = 0.01, 5.0  # recomputing a's tokens is slow
    res = simulate(cfg, work, "serverlessllm")
    assert res.decisions["migrate"] == 0
    assert _by_model(res, "m").cold_tier == "ssd" and _by_model(res, "m").server == "far"


# ---------------------------------------------------------------------------------------------- invariants


def _stress() -> tuple[SimConfig, list[Arrival]]:
    cfg = SimConfig.cluster(servers=6, gpus_per_server=2, models=30, gpu_memory=80 * 1024**3,
                            dram_bytes=150 * GB, ssd_bytes=600 * GB, keep_alive_s=10, max_concurrency=4,
                            max_instances=4, queue_timeout_s=60, seed=1)
    cfg.check_invariants = True  # memory, views and bookkeeping checked after every event
    work = gamma_workload(cfg.model_names(), rps=6, cv=4, duration_s=240, seed=3,
                          prompt_tokens=(16, 2048), output_tokens=(1, 400))
    return cfg, work


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_completes_or_times_out_and_no_gpu_is_over_its_memory(policy: str) -> None:
    cfg, work = _stress()
    res = simulate(cfg, work, policy, seed=7)
    assert len(res.requests) == len(work)
    for r, a in zip(res.requests, work):
        assert r.arrival_s == a.time_s and r.model == a.model
        assert r.status in ("done", "failed")
        if r.status == "done":
            assert r.ttft_s is not None and 0 <= r.ttft_s <= r.latency_s
        else:
            assert r.error.startswith("no_capacity") and r.latency_s >= cfg.queue_timeout_s - 1e-6
    s = res.summary()
    assert s["completed"] + s["failed"] == len(work)
    assert s["completed"] > 0.5 * len(work)
    assert 0 < s["gpu_utilization"] <= 1


def test_a_run_is_a_function_of_its_seed() -> None:
    cfg, work = _stress()
    cfg.check_invariants = False
    for policy in ("serverlessllm", "shepherd", "random"):
        a = simulate(cfg, work, policy, seed=3)
        b = simulate(cfg, work, policy, seed=3)
        assert a.requests == b.requests and a.loads == b.loads and a.decisions == b.decisions
    r1 = simulate(cfg, work, "random", seed=1).requests
    r2 = simulate(cfg, work, "random", seed=2).requests
    assert r1 != r2


def test_the_policies_differ_as_expected_at_moderate_load() -> None:
    cfg = SimConfig.cluster(servers=8, gpus_per_server=2, models=30, gpu_memory=80 * 1024**3,
                            dram_bytes=150 * GB, ssd_bytes=600 * GB, keep_alive_s=10, max_concurrency=4,
                            max_instances=4, queue_timeout_s=60, seed=1)
    work = gamma_workload(cfg.model_names(), rps=2, cv=2, duration_s=240, seed=1,
                          prompt_tokens=(16, 2048), output_tokens=(1, 400))
    s = {p: simulate(cfg, work, p, seed=0).summary() for p in POLICIES}
    assert s["serverlessllm"]["preemptions"] == 0 and s["shepherd"]["migrations"] == 0
    for p in ("locality-wait", "availability", "random"):
        assert s[p]["migrations"] == 0 and s[p]["preemptions"] == 0
        assert s[p]["decisions"]["migrate"] == s[p]["decisions"]["preempt"] == 0
    # Locality: far fewer loads from the repository, and much lower latency, than the locality-blind.
    for p in ("serverlessllm", "shepherd", "locality-wait"):
        for blind in ("availability", "random"):
            assert s[p]["cold_starts"]["repository"] * 4 < s[blind]["cold_starts"]["repository"]
            assert s[p]["latency_s"]["mean"] * 2 < s[blind]["latency_s"]["mean"]
            assert s[p]["ttft_s"]["p50"] * 10 < s[blind]["ttft_s"]["p50"]


# ---------------------------------------------------------------------------------------------- configs


def test_small_cpu_config_matches_the_default_topology() -> None:
    cfg = SimConfig.small_cpu()
    assert [s.name for s in cfg.servers] == ["node-1", "node-2"]
    assert all(s.gpu_memory == [3 * 1024**3] and s.dram_bytes == 4 * 1024**3 for s in cfg.servers)
    assert [m.name for m in cfg.models] == ["smollm2-135m"] and cfg.models[0].keep_alive_s == 300
    assert cfg.queue_timeout_s == 120 and cfg.batch_sharing == 1.0
    work = gamma_workload(["smollm2-135m"], rps=0.5, cv=2, duration_s=120, seed=0, prompt_tokens=(8, 64),
                          output_tokens=(8, 64))
    res = simulate(cfg, work, "serverlessllm")
    assert res.summary()["failed"] == 0
    assert res.requests[0].cold_tier == "ssd"  # every node has the converted checkpoint on SSD


def test_config_from_the_repository_topology() -> None:
    cfg = SimConfig.from_topology(Path(__file__).resolve().parents[1] / "topology.yaml",
                                  model_bytes={"smollm2-135m": 538_062_848})
    assert len(cfg.servers) == 2 and cfg.models[0].size_bytes == 538_062_848
    assert cfg.models[0].keep_alive_s == 300 and cfg.queue_timeout_s == 120


def test_calibration_file_overrides_by_model_then_size_class_then_default(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({
        "bandwidth": {"ssd": 3e9},
        "decode_s_per_token": 0.04,
        "migration": {"a": 0.001, "b": 0.2},
        "batch_sharing": 0.5,
        "size_classes": {"7b": {"decode_s_per_token": 0.02, "migration": {"b": 0.1}}},
        "models": {"model-0-7b": {"prefill_s_per_token": 0.003, "size_bytes": 123}},
    }))
    cfg = SimConfig.cluster(servers=2, gpus_per_server=1, models=3, size_mix={"7b": 1})
    cal = cfg.calibrated(load_calibration(path))
    assert cal.servers[0].bandwidth["ssd"] == 3e9 and cal.batch_sharing == 0.5
    m0, m1 = cal.models[0], cal.models[1]
    assert (m0.prefill_s_per_token, m0.size_bytes, m0.decode_s_per_token) == (0.003, 123, 0.02)
    assert (m1.migration_a, m1.migration_b) == (0.001, 0.1)
    assert cfg.models[0].size_bytes != 123, "the original is untouched"
    with pytest.raises(ValueError, match="unknown key"):
        apply_calibration(cfg, {"decode": 1})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(bad)


def test_command_line_compares_all_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    rc = main(["--servers", "4", "--gpus-per-server", "2", "--models", "12", "--rps", "2", "--duration", "60",
               "--seed", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["results"]] == list(POLICIES)
    assert data["gpus"] == 8
    table = capsys.readouterr().out
    assert all(p in table for p in POLICIES) and "lat p99" in table


def test_command_line_small_config_with_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "conv.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"2023-11-16 18:00:{s:02d}.5000000,{100 + s},{5 + s}\n" for s in range(0, 60, 3)))
    rc = main(["--small", "--policy", "serverlessllm", "--trace", "azure-conv", "--trace-dir", str(tmp_path),
               "--rps", "0.2", "--duration", "120", "--max-output", "16"])
    assert rc == 0 and "serverlessllm" in capsys.readouterr().out
    rc = main(["--small", "--trace", "azure-code", "--trace-dir", str(tmp_path)])
    assert rc == 2 and "code.csv not found" in capsys.readouterr().err


def test_command_line_topology_with_a_calibration_and_flags_that_win(tmp_path: Path) -> None:
    from sllm_eval.simulator import build_parser, config_from_args

    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"bandwidth": {"ssd": 5e8, "dram": 4e9}, "decode_s_per_token": 0.05,
                               "models": {"smollm2-135m": {"size_bytes": 600_000_000}}}))
    topo = Path(__file__).resolve().parents[1] / "topology.yaml"
    args = build_parser().parse_args(["--topology", str(topo), "--calibration", str(cal), "--ssd-bandwidth", "2GB",
                                      "--start-tier", "repository"])
    cfg = config_from_args(args)
    assert [s.bandwidth["ssd"] for s in cfg.servers] == [2e9, 2e9]  # the flag wins over the file
    assert cfg.servers[0].bandwidth["dram"] == 4e9
    assert cfg.models[0].size_bytes == 600_000_000 and cfg.models[0].decode_s_per_token == 0.05
    (r,) = simulate(cfg, [Arrival(0, "smollm2-135m", 10, 3)], "serverlessllm").requests
    assert r.cold_tier == "repository"
    assert r.ttft_s == pytest.approx(600_000_000 / cfg.servers[0].bandwidth["repository"] + 10 * 4e-4)


def test_command_line_replays_a_saved_workload_and_writes_records(tmp_path: Path) -> None:
    from sllm_eval.workload import save_workload

    work = [Arrival(0.0, "smollm2-135m", 20, 5), Arrival(0.5, "smollm2-135m", 30, 8)]
    save_workload(tmp_path / "w.csv", work)
    out = tmp_path / "r.json"
    assert main(["--small", "--workload", str(tmp_path / "w.csv"), "--policy", "serverlessllm", "--records",
                 "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert [r["prompt_tokens"] for r in result["records"]] == [20, 30]
    assert all(r["status"] == "done" and r["latency_s"] > 0 for r in result["records"])
    save_workload(tmp_path / "other.csv", [Arrival(0.0, "nope", 1, 1)])
    assert main(["--small", "--workload", str(tmp_path / "other.csv")]) == 2


# ---------------------------------------------------------------------------------------------- calibrated refinements


def test_a_load_pays_its_tiers_fixed_time_and_the_estimator_knows_it() -> None:
    cfg = SimConfig([_server("s")], [_model("m", 2)], initial_ssd={"m": ["s"]}, load_fixed_s={"ssd": 1.5})
    res = simulate(cfg, [Arrival(0.0, "m", 100, 1)], "serverlessllm")
    assert res.requests[0].ttft_s == pytest.approx(2.0 + 1.5 + 0.1)


def test_instances_on_a_host_of_few_cores_share_them() -> None:
    # Two servers, one model each; one core for the whole cluster: two instances decoding at once each go
    # at half speed, and the survivor speeds up when the other finishes.
    models = [_model("a", 1), _model("b", 1)]
    work = [Arrival(0.0, "a", 1, 11), Arrival(0.0, "b", 1, 21)]
    init = {"a": ["s1"], "b": ["s2"]}
    alone = simulate(SimConfig([_server("s1"), _server("s2")], models, initial_ssd=init), work, "locality-wait")
    shared = simulate(SimConfig([_server("s1"), _server("s2")], models, initial_ssd=init, shared_cores=1.0,
                                check_invariants=True), work, "locality-wait")
    a0, b0 = alone.requests
    a1, b1 = shared.requests
    assert a0.latency_s == pytest.approx(1.0 + 0.001 + 10 * 0.01)
    # Both load for 1 s, then share: a needs 0.101 s of work, done at 1 + 2 * 0.101; b has 0.201 - 0.101
    # left then, alone.
    assert a1.latency_s == pytest.approx(1.0 + 2 * 0.101)
    assert b1.latency_s == pytest.approx(1.0 + 2 * 0.101 + 0.1)
    assert b0.latency_s == pytest.approx(1.0 + 0.201)
    # With two cores for two instances nothing changes.
    two = simulate(SimConfig([_server("s1"), _server("s2")], models, initial_ssd=init, shared_cores=2.0), work,
                   "locality-wait")
    assert [r.latency_s for r in two.requests] == pytest.approx([a0.latency_s, b0.latency_s])


def test_calibration_sets_load_fixed_times_and_shared_cores_and_rejects_bad_ones(tmp_path: Path) -> None:
    cfg = SimConfig([_server("s")], [_model("m", 2)])
    out = apply_calibration(cfg, {"load_fixed_s": {"dram": 0.5, "repository": 3}, "shared_cores": 2})
    assert out.load_fixed_s == {"dram": 0.5, "repository": 3.0} and out.shared_cores == 2.0
    for bad in ({"load_fixed_s": {"disk": 1}}, {"load_fixed_s": {"ssd": -1}}, {"shared_cores": -2},
                {"decode_s_per_token": "fast"}):
        path = tmp_path / "cal.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=next(iter(bad))):
            load_calibration(path)


def test_migration_switched_off_makes_serverlessllm_wait_like_locality_wait() -> None:
    from dataclasses import replace

    from sllm_actors.policy.placement import placement_policy

    assert placement_policy("serverlessllm", False) == "locality-wait"
    assert placement_policy("serverlessllm", True) == "serverlessllm"
    assert placement_policy("shepherd", False) == "shepherd"  # preemption is not migration
    cfg, work = _busy_near_scenario()
    off = simulate(replace(cfg, migration=False), work, "serverlessllm", seed=0)
    assert off.decisions["migrate"] == 0 and off.migrations == 0
    wait = simulate(cfg, work, "locality-wait", seed=0)
    assert [r.latency_s for r in off.requests] == [r.latency_s for r in wait.requests]


def test_on_cpu_devices_a_load_beside_a_decode_is_slowed_as_placement_estimates_it() -> None:
    # s1 has two devices; a decodes on one (a 2,000-token request: 20 s); m then arrives. With m on SSD at s1 only,
    # its load goes beside a's decode on the same host's cores: twice its 2 s, and the estimate says so (moving a
    # to s1's other device would keep its decode on the host). With a copy on s2 too, placement loads it on the
    # quiet node. Independent GPUs (cpu_devices off): 2 s beside the decode.
    models = [_model("a", 1), _model("m", 2)]
    work = [Arrival(0.0, "a", 1, 2001), Arrival(1.5, "m", 1, 1)]

    def run(m_on: list[str], cpu: bool):
        cfg = SimConfig([_server("s1", gpus=2), _server("s2")], models, initial_ssd={"a": ["s1"], "m": m_on},
                        cpu_devices=cpu, check_invariants=True)
        return simulate(cfg, work, "serverlessllm")

    beside = run(["s1"], cpu=True)
    assert _by_model(beside, "m").ttft_s == pytest.approx(2 * 2.0 + 0.001)
    estimated, took = next((e, t) for tier, e, t in beside.estimates if t > 3.0)
    assert estimated == pytest.approx(took) == pytest.approx(4.0)
    quiet = run(["s1", "s2"], cpu=True)
    assert _by_model(quiet, "m").server == "s2" and _by_model(quiet, "m").ttft_s == pytest.approx(2.0 + 0.001)
    assert _by_model(run(["s1"], cpu=False), "m").ttft_s == pytest.approx(2.0 + 0.001)


def test_with_the_node_pipeline_the_estimates_match_overlapping_loads() -> None:
    # One GPU with room for both: a model fetched from the repository, then one in DRAM ordered during that
    # fetch. The node runs the DRAM load beside the fetch, so its estimate must not count the fetch (it once did).
    models = [_model("far", 2), _model("near", 2)]
    cfg = SimConfig([_server("s")], models, initial_ssd={"near": ["s"]}, initial_dram={"near": ["s"]},
                    load_pipeline="node", check_invariants=True)
    res = simulate(cfg, [Arrival(0.0, "far", 10, 1), Arrival(1.0, "near", 10, 1)], "serverlessllm")
    assert [r.status for r in res.requests] == ["done", "done"]
    assert sorted(tier for tier, _, _ in res.estimates) == ["dram", "repository"]
    for tier, estimated, took in res.estimates:
        assert estimated == pytest.approx(took, rel=0.2), tier
    far, near = res.requests
    assert near.ttft_s < far.ttft_s - 1.0  # it did not wait for the fetch


# ---------------------------------------------------------------------------------------------- baselines


def test_baselines_download_at_every_cold_start_and_only_the_cache_keeps_a_copy() -> None:
    from sllm_eval.simulator import BaselineCosts

    costs = BaselineCosts(hf_bandwidth=2 * GB, hf_fixed_s=0.5, process_start_s=3.0)
    # keep-alive 1 s: the second request, 100 s later, is a cold start again.
    cfg = SimConfig([_server("s")], [_model("m", 2, keep_alive_s=1)], initial_ssd={"m": ["s"]}, baseline=costs)
    work = [Arrival(0.0, "m", 100, 1), Arrival(100.0, "m", 100, 1)]
    download, local = 2 / 0.1, 2 / 2 + 0.5  # 2 GB at the repository's 0.1 GB/s; from_pretrained at 2 GB/s
    ray = simulate(cfg, work, "rayserve")
    assert [r.cold_tier for r in ray.requests] == ["repository", "repository"]  # the SSD copy is ours, not its
    assert [r.ttft_s for r in ray.requests] == pytest.approx([download + local + 0.1] * 2)
    # The cache's copies start where the platform seeded checkpoints (the replay's --ssd-seed puts its safetensors
    # copies there); without a seed its first start downloads, the second finds the kept copy.
    assert [r.cold_tier for r in simulate(cfg, work, "rayserve-cache").requests] == ["ssd", "ssd"]
    cache = simulate(replace(cfg, initial_ssd={}), work, "rayserve-cache")
    assert [r.cold_tier for r in cache.requests] == ["repository", "ssd"]
    assert cache.requests[1].ttft_s == pytest.approx(local + 0.1)
    kserve = simulate(cfg, work, "kserve")
    assert [r.ttft_s for r in kserve.requests] == pytest.approx([download + 3.0 + local + 0.1] * 2)
    ours = simulate(cfg, work, "serverlessllm")
    assert ours.requests[0].ttft_s == pytest.approx(2.0 + 0.1) and ours.requests[1].cold_tier == "dram"


def test_a_nodes_baseline_downloads_take_turns() -> None:
    from sllm_eval.simulator import BaselineCosts

    cfg = SimConfig([_server("s", gpus=2)], [_model("a", 1), _model("b", 1)], initial_ssd={},
                    baseline=BaselineCosts(hf_bandwidth=10 * GB, hf_fixed_s=0.0))
    res = simulate(cfg, [Arrival(0.0, "a", 10, 1), Arrival(0.0, "b", 10, 1)], "rayserve")
    # One download at a time per node (10 s each at 0.1 GB/s), from_pretrained 0.1 s after each.
    assert sorted(r.ttft_s for r in res.requests) == pytest.approx([10.1 + 0.01, 20.1 + 0.01])


def test_calibration_sets_the_baselines_costs(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"baseline": {"hf_bandwidth": 1.5e9, "process_start_s": 4.0}}))
    cfg = apply_calibration(SimConfig([_server("s")], [_model("m", 1)]), load_calibration(path))
    assert cfg.baseline.hf_bandwidth == 1.5e9 and cfg.baseline.process_start_s == 4.0 and cfg.baseline.hf_fixed_s == 1.0
    path.write_text(json.dumps({"baseline": {"hf_bandwidth": 0}}))
    with pytest.raises(ValueError, match="baseline"):
        load_calibration(path)


def test_a_nodes_baseline_builds_take_turns() -> None:
    from sllm_eval.simulator import BaselineCosts

    # Both models kept on the node (rayserve-cache, seeded): no download, but from_pretrained takes the node's
    # build lock, 1 + 0.5 s each: the second load waits for the first.
    cfg = SimConfig([_server("s", gpus=2)], [_model("a", 1), _model("b", 1)], initial_ssd={"a": ["s"], "b": ["s"]},
                    baseline=BaselineCosts(hf_bandwidth=2 * GB, hf_fixed_s=1.0))
    res = simulate(cfg, [Arrival(0.0, "a", 10, 1), Arrival(0.0, "b", 10, 1)], "rayserve-cache")
    assert sorted(r.ttft_s for r in res.requests) == pytest.approx([1.5 + 0.01, 3.0 + 0.01])
