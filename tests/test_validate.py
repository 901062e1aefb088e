"""Simulator validation against a replay (sllm_eval/sim_validate.py), on a small replay JSON built here
whose costs are known: the derived calibration must find them, and the simulation must then match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sllm_eval.sim_validate import (
    ReplayError,
    derive_calibration,
    load_replay,
    replay_config,
    replay_workload,
    validate,
)
from sllm_eval.simulator import load_calibration

MB = 1_000_000
T0 = 1_700_000_000.0

TOPOLOGY = """
controller: {host: 127.0.0.1, client_port: 0, cluster_port: 0, state_port: 0}
nodes:
- name: node-1
  gpus: [{device: cpu, memory: 4000000000}]
  dram: {capacity: 2000000000}
  ssd: {path: /tmp/x/ssd-1, capacity: 4000000000, bandwidth: 300000000}
  repository: {bandwidth: 100000000}
- name: node-2
  gpus: [{device: cpu, memory: 4000000000}]
  dram: {capacity: 2000000000}
  ssd: {path: /tmp/x/ssd-2, capacity: 4000000000, bandwidth: 300000000}
  repository: {bandwidth: 100000000}
models:
- {name: a, source: /m/a, keep_alive: 10s, target_concurrency: 2}
- {name: b, source: /m/b, keep_alive: 10s, target_concurrency: 2}
scheduler: {policy: locality-wait, queue_timeout: 60s}
"""


def _record(i: int, model: str, arrival: float, prompt: int, out: int, ttft: float, latency: float) -> dict:
    return {"index": i, "model": model, "arrival_s": arrival, "prompt_tokens": prompt, "output_tokens": out,
            "request_id": f"r{i}", "ttft_s": ttft, "latency_s": latency, "tokens": out, "migrations": [],
            "error_code": "", "error_message": ""}


def _replay() -> dict:
    """Loads from the repository cost 2 s + bytes / 100 MB/s; model a decodes at 0.05 s a token and
    prefills at 0.01 s a prompt token, b decodes at 0.1 s; 4 cores, so three requests never share."""
    records = [
        _record(0, "a", 0.0, 10, 11, 3.0 + 0.1, 3.1 + 10 * 0.05),   # cold: 100 MB from the repository
        _record(2, "a", 5.0, 10, 11, 0.1, 0.1 + 10 * 0.05),         # warm: a is loaded since t = 3
        _record(1, "b", 10.0, 10, 11, 4.0 + 0.2, 4.2 + 10 * 0.1),   # cold: 200 MB
    ]
    events = [
        {"time": T0 + 0.002, "kind": "schedule", "text": "", "data": {"request_id": "r0", "decision": "load"}},
        {"time": T0 + 3.0, "kind": "load", "text": "", "data": {"node": "node-1", "model": "a", "tier": "repository",
                                                               "seconds": 3.0}},
        {"time": T0 + 10.003, "kind": "schedule", "text": "", "data": {"request_id": "r1", "decision": "load"}},
        {"time": T0 + 14.0, "kind": "load", "text": "", "data": {"node": "node-2", "model": "b", "tier": "repository",
                                                                "seconds": 4.0}},
    ]
    return {"args": {"device": "cpu"}, "machine": {"cpus": 4}, "setup": {"topology": TOPOLOGY},
            "family": [{"name": "a", "bytes": 100 * MB}, {"name": "b", "bytes": 200 * MB}],
            "records": {"locality-wait": records}, "events": {"locality-wait": events}}


def test_calibration_finds_the_load_and_token_costs_the_replay_ran_with(tmp_path: Path) -> None:
    cal = derive_calibration(_replay())
    assert cal["bandwidth"]["repository"] == pytest.approx(100 * MB)
    assert cal["load_fixed_s"]["repository"] == pytest.approx(2.0)
    assert cal["bandwidth"]["ssd"] == 300 * MB  # never loaded from: the topology's
    a, b = cal["models"]["a"], cal["models"]["b"]
    assert a["decode_s_per_token"] == pytest.approx(0.05) and b["decode_s_per_token"] == pytest.approx(0.1)
    assert a["prefill_s_per_token"] == pytest.approx(0.01)  # from the warm request
    assert b["prefill_s_per_token"] == pytest.approx(0.1 * 0.01 / 0.05)  # no warm request: a's ratio
    assert cal["shared_cores"] == 4.0 and a["size_bytes"] == 100 * MB
    # It is a calibration file the simulator reads.
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    assert load_calibration(path)["models"]["b"]["size_bytes"] == 200 * MB


def test_the_rebuilt_run_has_the_replays_workload_and_cluster() -> None:
    replay = _replay()
    work = replay_workload(replay, "locality-wait")
    assert [(w.time_s, w.model, w.prompt_tokens, w.output_tokens) for w in work] == [
        (0.0, "a", 10, 11), (5.0, "a", 10, 11), (10.0, "b", 10, 11)]
    cfg = replay_config(replay, derive_calibration(replay))
    assert [s.name for s in cfg.servers] == ["node-1", "node-2"]
    assert cfg.servers[0].dram_bytes == 2_000_000_000 and cfg.queue_timeout_s == 60.0
    assert {m.name: (m.max_concurrency, m.keep_alive_s) for m in cfg.models} == {"a": (2, 10.0), "b": (2, 10.0)}
    assert cfg.initial_ssd == {} and cfg.load_fixed_s["repository"] == pytest.approx(2.0)


def test_with_those_costs_the_simulation_matches_the_replay() -> None:
    result = validate(_replay())
    (row,) = result["policies"]
    assert row["pass"] and result["pass"]
    for key, err in row["rel_error"].items():
        assert err == pytest.approx(0.0, abs=1e-6), key
    assert row["sim"]["loads"] == row["real"]["loads"] == {"dram": 0, "ssd": 0, "repository": 2}


def test_a_replay_without_what_is_needed_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"records": {}}))
    with pytest.raises(ReplayError, match="no 'events'"):
        load_replay(path)
    replay = _replay()
    replay["events"]["locality-wait"] = [e for e in replay["events"]["locality-wait"] if e["kind"] != "load"]
    with pytest.raises(ReplayError, match="no load events"):
        derive_calibration(replay)


def _seeded_replay() -> dict:
    """As _replay, but run with ``--ssd-seed``: b's checkpoint sat on node-2's SSD from the start, so its
    cold start read 200 MB from that SSD (300 MB/s in the topology) in 1 s instead of fetching it."""
    replay = _replay()
    replay["setup"]["ssd_seed"] = {"b": ["node-2"]}
    records = replay["records"]["locality-wait"]
    records[2] = _record(1, "b", 10.0, 10, 11, 1.0 + 0.2, 1.2 + 10 * 0.1)
    replay["events"]["locality-wait"][3] = {
        "time": T0 + 11.0, "kind": "load", "text": "",
        "data": {"node": "node-2", "model": "b", "tier": "ssd", "seconds": 1.0}}
    return replay


def test_a_seeded_replay_starts_the_simulated_ssd_tiers_with_its_checkpoints(tmp_path: Path) -> None:
    replay = _seeded_replay()
    cal = derive_calibration(replay)
    assert cal["initial_ssd"] == {"b": ["node-2"]}
    assert cal["load_fixed_s"]["ssd"] == pytest.approx(1.0 - 200 / 300)
    cfg = replay_config(replay, cal)
    assert cfg.initial_ssd == {"b": ["node-2"]}
    # The calibration file carries the seed to `sllm simulate --calibration` too.
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    assert load_calibration(path)["initial_ssd"] == {"b": ["node-2"]}
    (row,) = validate(replay)["policies"]
    assert row["sim"]["loads"] == row["real"]["loads"] == {"dram": 0, "ssd": 1, "repository": 1}
    assert row["pass"]
    for key, err in row["rel_error"].items():
        assert err == pytest.approx(0.0, abs=1e-6), key
    # Without the seed the simulation fetches b from the repository and misses the replay.
    unseeded = {k: v for k, v in cal.items() if k != "initial_ssd"}
    unseeded["initial_ssd"] = {}
    (row,) = validate(replay, calibration=unseeded)["policies"]
    assert row["sim"]["loads"]["repository"] == 2 and not row["pass"]


def test_a_seed_naming_an_unknown_node_is_refused() -> None:
    replay = _seeded_replay()
    replay["setup"]["ssd_seed"] = {"b": ["node-9"]}
    with pytest.raises(ReplayError, match="node-9"):
        derive_calibration(replay)


def _replay_with_a_baseline() -> dict:
    """_seeded_replay's locality-wait run beside a Ray Serve run of the same workload, as a sweep writes it (a
    topology and a seed per policy). Ray Serve's cold starts: a download at the topology's 100 MB/s, then
    from_pretrained and the rest at 0.5 s + bytes / 400 MB/s; a waits 1 + 0.75, b 2 + 1."""
    replay = _seeded_replay()
    replay["setup"]["topology"] = {"locality-wait": TOPOLOGY, "rayserve": TOPOLOGY.replace("locality-wait", "availability")}
    replay["setup"]["ssd_seed"] = {"locality-wait": replay["setup"]["ssd_seed"], "rayserve": {}}
    replay["setup"]["policies"] = {"locality-wait": {"placement": "locality-wait", "load_mode": "serverlessllm"},
                                   "rayserve": {"placement": "availability", "load_mode": "rayserve"}}
    a_load, b_load = 1.0 + 0.75, 2.0 + 1.0
    replay["records"]["rayserve"] = [
        _record(0, "a", 0.0, 10, 11, a_load + 0.1, a_load + 0.1 + 10 * 0.05),
        _record(2, "a", 5.0, 10, 11, 0.1, 0.1 + 10 * 0.05),
        _record(1, "b", 10.0, 10, 11, b_load + 0.2, b_load + 0.2 + 10 * 0.1),
    ]
    replay["events"]["rayserve"] = [
        {"time": T0 + 0.002, "kind": "schedule", "text": "", "data": {"request_id": "r0", "decision": "load"}},
        {"time": T0 + a_load, "kind": "load", "text": "", "data": {
            "node": "node-1", "model": "a", "tier": "repository", "seconds": a_load, "load_mode": "rayserve",
            "parts": {"download": 1.0, "download_queue": 0.0, "from_pretrained": 0.7, "to_device": 0.05}}},
        {"time": T0 + 10.003, "kind": "schedule", "text": "", "data": {"request_id": "r1", "decision": "load"}},
        {"time": T0 + 10 + b_load, "kind": "load", "text": "", "data": {
            "node": "node-1", "model": "b", "tier": "repository", "seconds": b_load, "load_mode": "rayserve",
            "parts": {"download": 2.0, "download_queue": 0.0, "from_pretrained": 0.95, "to_device": 0.05}}},
    ]
    return replay


def test_a_baselines_loads_calibrate_its_costs_not_our_tiers() -> None:
    replay = _replay_with_a_baseline()
    cal = derive_calibration(replay)
    assert cal["baseline"]["hf_bandwidth"] == pytest.approx(400 * MB)
    assert cal["baseline"]["hf_fixed_s"] == pytest.approx(0.5)
    assert cal["baseline"]["download_bandwidth"] == 100 * MB
    assert cal["bandwidth"]["repository"] == pytest.approx(100 * MB)  # from locality-wait's loads alone
    assert cal["load_fixed_s"]["repository"] == pytest.approx(2.0)
    assert cal["initial_ssd"] == {"b": ["node-2"]}
    result = validate(replay)
    by_policy = {row["policy"]: row for row in result["policies"]}
    assert by_policy["rayserve"]["sim"]["loads"] == by_policy["rayserve"]["real"]["loads"] == \
        {"dram": 0, "ssd": 0, "repository": 2}
    for key, err in by_policy["rayserve"]["rel_error"].items():
        assert err == pytest.approx(0.0, abs=1e-6), key
    assert result["pass"]


def test_a_warm_request_that_waited_for_a_slot_does_not_count_as_prefill() -> None:
    # Four more requests for a arrive with the first warm one, at t = 5: a's one instance takes two at a time, so
    # the last three waited 0.6 s for a slot; their TTFTs are not a prefill's time (counted, they would be most).
    replay = _replay()
    records = replay["records"]["locality-wait"]
    records += [_record(3, "a", 5.0, 10, 11, 0.1, 0.1 + 10 * 0.05)]
    records += [_record(i, "a", 5.0, 10, 11, 0.6 + 0.1, 0.6 + 0.1 + 10 * 0.05) for i in (4, 5, 6)]
    cal = derive_calibration(replay)
    assert cal["models"]["a"]["prefill_s_per_token"] == pytest.approx(0.01)


def test_a_run_with_no_warm_request_takes_its_prefill_from_the_first_requests_after_a_load() -> None:
    # Every request waited for a load (the GPU sweep's rayserve-cache run: its bursts left no warm request a free
    # slot). Without a prefill measured, the simulator's default (0.2 ms a token) made its prompts ~10x too fast;
    # the first token after the load's end gives it: a's 0.1 s and b's 0.2 s over 10 prompt tokens.
    replay = _replay()
    replay["records"]["locality-wait"] = [r for r in replay["records"]["locality-wait"] if r["request_id"] != "r2"]
    cal = derive_calibration(replay)
    # (Within 2 %: the replay's clock offset, read from its first decision's event, is 2 ms off the loads'.)
    assert cal["models"]["a"]["prefill_s_per_token"] == pytest.approx(0.01, rel=0.03)
    assert cal["models"]["b"]["prefill_s_per_token"] == pytest.approx(0.02, rel=0.03)
    assert "after a load" in cal["comment"]["prefill_from"]
    # With a warm request, its prefill is what counts, as before.
    assert "warm" in derive_calibration(_replay())["comment"]["prefill_from"]
