"""Validate the simulator against a real replay (``sllm bench replay --json``): issue 5's 20 % bar.

Three steps, each usable alone:

* :func:`derive_calibration`: costs measured in the replay, never its latency outcomes as such:

  - per tier, load time = bytes / bandwidth + fixed, least squares over the ``load`` events (each model's
    checkpoint bytes from ``family``) of loads that did not overlap another load on the same node (the
    node builds one model at a time, so an overlapped load's time includes waiting; the simulator
    queues that wait itself). With one size loaded from a tier, the topology's bandwidth for it is kept
    and only the fixed part is fitted.
  - per model, decode seconds per token = median over requests of (latency - TTFT) / (tokens - 1), each
    divided by the sharing it decoded under: on CPU devices (every node a process on one host of
    ``machine.cpus`` cores) the mean of max(S(t), N(t) / cores) over its decode window, N(t) the requests
    decoding at t in the whole run, S(t) the requests of its model decoding at t capped at the
    instance's ``target_concurrency`` (an instance steps its requests in turn); on GPUs the mean of S(t).
    (The simulator's own model: an instance of n requests on a host where A instances decode gives each
    1 / (n max(1, A / cores)); with instances equally full that is max(n, N / cores).)
  - per model, prefill seconds per prompt token = median over warm requests (an instance of the model
    was loaded at their arrival, from the load / unload events) of TTFT / sharing / prompt tokens;
    a model without warm requests gets the others' median prefill-to-decode ratio. A run with no warm request
    that found a free slot at all (every request in a burst) takes it from the first requests served when an
    instance they waited for became ready (first token - ready, per prompt token), else from the replay's
    other runs' prefill-to-decode ratio.
  - migration ``a``, ``b`` from the replay's migration records (tokens recomputed, seconds), if any.
  - ``shared_cores`` = ``machine.cpus`` for CPU devices, else 0.

* :func:`replay_workload` and :func:`replay_config`: the same arrivals (times, models, prompt and output
  tokens) and the cluster of ``setup.topology`` (tiers, capacities, keep-alive, target concurrency, max
  instances, queue timeout), every node starting with empty tiers except the replay's warm-up model
  and, for a replay run with ``--ssd-seed``, the checkpoints it put on nodes' SSD tiers before the
  cluster started (``setup.ssd_seed``; carried in the calibration as ``initial_ssd``).
* :func:`validate`: simulate each policy and compare mean / p50 / p99 latency and TTFT and loads by tier.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from sllm_eval.simulator import TIERS, SimConfig, apply_calibration, simulate
from sllm_eval.stats import stats
from sllm_eval.workload import Arrival

__all__ = [
    "WARMUP_BYTES",
    "ReplayError",
    "derive_calibration",
    "format_report",
    "load_replay",
    "replay_config",
    "replay_workload",
    "ssd_seed",
    "validate",
]

WARMUP_MODEL = "warmup"
WARMUP_BYTES = 13_000_000
"""The replay's warm-up model (``replay.make_warmup_model``: 256 wide, 4 layers, fp32) on disk: it sits
in every node's DRAM and SSD tiers when the replay starts, the oldest entry of each."""
BAR = 0.20
HELD = (("latency_s", "mean"), ("latency_s", "p50"))
"""Statistics held to the 20 % bar per policy; p99 and TTFT are reported beside them."""


class ReplayError(ValueError):
    """The replay JSON lacks something the validation needs; the message says what."""


# ---------------------------------------------------------------------------------------------- reading


def load_replay(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ReplayError(f"{path}: not valid JSON: {exc}") from None
    for key in ("records", "events", "setup", "family"):
        if key not in data:
            raise ReplayError(f"{path}: no {key!r} (expected the JSON of `sllm bench replay --json`)")
    if "topology" not in data["setup"]:
        raise ReplayError(f"{path}: setup has no topology text (a replay against --cluster cannot be validated)")
    return data


def _ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("error_code") and r.get("latency_s") is not None
            and r.get("ttft_s") is not None]


def model_bytes(replay: dict[str, Any]) -> dict[str, int]:
    return {f["name"]: int(f["bytes"]) for f in replay["family"]}


def clock_offset(replay: dict[str, Any], policy: str) -> float:
    """Wall time of the replay's t = 0 for ``policy``: events carry wall times, records arrival offsets.

    The scheduler logs each placement decision with the request id, a few ms after the arrival; the
    smallest (event time - arrival) over the requests so matched is the start, to a few ms."""
    arrival = {r["request_id"]: r["arrival_s"] for r in replay["records"][policy] if r.get("request_id")}
    gaps = [e["time"] - arrival[e["data"]["request_id"]] for e in replay["events"].get(policy, [])
            if e["kind"] == "schedule" and (e.get("data") or {}).get("request_id") in arrival]
    if gaps:
        return min(gaps)
    events = replay["events"].get(policy) or []
    return min((e["time"] for e in events), default=0.0)


def load_samples(replay: dict[str, Any], policy: str) -> list[dict[str, Any]]:
    """The run's loads of family models: tier, model, bytes, seconds, start and end on the replay clock,
    and whether another load overlapped it on the same node."""
    sizes = model_bytes(replay)
    t0 = clock_offset(replay, policy)
    out = []
    for e in replay["events"].get(policy, []):
        d = e.get("data") or {}
        if e["kind"] != "load" or d.get("model") not in sizes or d.get("tier") not in TIERS:
            continue
        end = e["time"] - t0
        out.append({"tier": d["tier"], "model": d["model"], "bytes": sizes[d["model"]], "seconds": float(d["seconds"]),
                    "node": d.get("node", ""), "start": end - float(d["seconds"]), "end": end,
                    "parts": dict(d.get("parts") or {})})
    out = [s for s in out if s["start"] >= -1.0]  # the warm-up's loads come before the run
    for s in out:
        s["overlapped"] = any(o is not s and o["node"] == s["node"] and o["start"] < s["end"] and o["end"] > s["start"]
                              for o in out)
    return out


# ---------------------------------------------------------------------------------------------- topology


def _topology(replay: dict[str, Any]) -> Any:
    from sllm_actors.runtime.topology import load_topology

    with tempfile.TemporaryDirectory(prefix="sllm-validate-") as tmp:
        path = Path(tmp) / "topology.yaml"
        path.write_text(topology_text(replay))
        return load_topology(path)


def topology_text(replay: dict[str, Any]) -> str:
    """The replay's topology: one text, or (a replay of several policies, each its own cluster) one per policy,
    which differ only in the policy and load mode (the simulator takes those by name): the first."""
    topo = replay["setup"]["topology"]
    return str(next(iter(topo.values()))) if isinstance(topo, dict) else str(topo)


def load_mode(replay: dict[str, Any], policy: str) -> str:
    """How ``policy``'s nodes loaded (``serverlessllm``, or a baseline's mode: ``replay.BASELINES``)."""
    from sllm_eval.simulator import BASELINES

    given = (((replay.get("setup") or {}).get("policies") or {}).get(policy) or {}).get("load_mode")
    return str(given or (policy if policy in BASELINES else "serverlessllm"))


def _is_cpu(replay: dict[str, Any]) -> bool:
    topo = _topology(replay)
    return all(g.device == "cpu" for n in topo.nodes for g in n.gpus)


# ---------------------------------------------------------------------------------------------- calibration


def _fit_tier(samples: list[dict[str, Any]], default_bw: float) -> dict[str, Any]:
    clean = [s for s in samples if not s["overlapped"]] or samples
    xs = [float(s["bytes"]) for s in clean]
    ys = [s["seconds"] for s in clean]
    fit: dict[str, Any] = {"samples": len(clean), "overlapped_left_out": len(samples) - len(clean)}
    if len(set(xs)) >= 2:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        if slope > 0:
            bw = 1.0 / slope
            fixed = my - slope * mx
            if fixed >= 0:
                return {**fit, "bandwidth": bw, "fixed_s": fixed, "how": "least squares over sizes"}
    fixed = statistics.median(y - x / default_bw for x, y in zip(xs, ys))
    return {**fit, "bandwidth": default_bw, "fixed_s": max(0.0, fixed),
            "how": "topology bandwidth, median fixed part (one size, or a fit with no positive bandwidth)"}


DOWNLOAD_PARTS = ("download", "download_queue", "process_start", "queue")
"""A baseline load's parts that are not its ``from_pretrained``: what the simulator prices apart (``queue``: the wait
for the node's build lock, which the simulator queues itself)."""


def _fit_baseline(samples: list[dict[str, Any]], repository_bw: float) -> tuple[dict[str, float], dict[str, Any]]:
    """The simulator's ``BaselineCosts`` from a replay's baseline loads: what is left of each load without its
    download, its waits for the node's other downloads and builds and its process start (``from_pretrained``, the
    copy to the device, the engine's set-up) as bytes / bandwidth + fixed over the sizes loaded; the process start's median;
    the download at the topology's repository bandwidth (the pace the baseline's copy is held to)."""
    local = [(float(s["bytes"]), s["seconds"] - sum(float(s["parts"].get(k, 0.0)) for k in DOWNLOAD_PARTS))
             for s in samples]
    starts = [float(s["parts"]["process_start"]) for s in samples if "process_start" in s["parts"]]
    fit = _fit_tier([{"bytes": b, "seconds": y, "overlapped": False} for b, y in local], 2e9)
    costs = {"hf_bandwidth": fit["bandwidth"], "hf_fixed_s": fit["fixed_s"], "download_bandwidth": repository_bw}
    if starts:
        costs["process_start_s"] = statistics.median(starts)
    return costs, {"samples": len(samples), "local_fit": fit, "process_starts": len(starts)}


def _decoding(records: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    return [(r["arrival_s"] + r["ttft_s"], r["arrival_s"] + r["latency_s"], r["model"]) for r in records
            if r.get("tokens", 0) >= 2]


def _sharing(t0: float, t1: float, model: str, windows: list[tuple[float, float, str]], cores: float,
             per_instance: int, steps: int = 40) -> float:
    """Mean slowdown from sharing over [t0, t1] (see the module docstring), sampled at ``steps`` points."""
    if t1 <= t0:
        t1 = t0 + 1e-6
    total = 0.0
    for k in range(steps):
        t = t0 + (t1 - t0) * (k + 0.5) / steps
        same = max(1, min(per_instance, sum(1 for a, b, m in windows if m == model and a <= t < b)))
        if cores > 0:
            n = sum(1 for a, b, _ in windows if a <= t < b)
            total += max(same, n / cores)
        else:
            total += same
    return total / steps


def derive_calibration(replay: dict[str, Any], policies: list[str] | None = None) -> dict[str, Any]:
    """A calibration (the simulator's ``load_calibration`` schema) from the replay's measurements, pooled
    over ``policies`` (default: every policy in the replay)."""
    policies = policies or list(replay["records"])
    missing = [p for p in policies if p not in replay["records"]]
    if missing:
        raise ReplayError(f"no records for {', '.join(missing)} (the replay has {', '.join(replay['records'])})")
    topo = _topology(replay)
    cpu = _is_cpu(replay)
    cores = float((replay.get("machine") or {}).get("cpus") or 0) if cpu else 0.0
    if cpu and cores <= 0:
        raise ReplayError("CPU devices but no machine.cpus in the replay: cannot model their sharing")
    per_instance = {m.name: m.target_concurrency for m in topo.models}
    sizes = model_bytes(replay)

    # Loads, per tier.
    default_bw: dict[str, float] = {}
    from sllm_actors.policy import placement

    for tier in TIERS:
        bws = [getattr(n, f"{tier}_bandwidth", None) for n in topo.nodes]
        bws = [b for b in bws if b]
        default_bw[tier] = float(min(bws)) if bws else placement.DEFAULT_BANDWIDTH[tier]
    by_tier: dict[str, list[dict[str, Any]]] = defaultdict(list)
    baseline_loads: list[dict[str, Any]] = []
    for p in policies:
        for s in load_samples(replay, p):
            # A baseline's loads (download, from_pretrained) say nothing about our tiers' speeds: fitted apart.
            (by_tier[s["tier"]] if load_mode(replay, p) == "serverlessllm" else baseline_loads).append(s)
    if not by_tier and not baseline_loads:
        raise ReplayError("no load events of the family's models: nothing to calibrate loads from")
    fits = {t: _fit_tier(v, default_bw[t]) for t, v in by_tier.items()}
    # A tier never loaded from keeps its topology bandwidth and the others' mean fixed part.
    mean_fixed = statistics.fmean(f["fixed_s"] for f in fits.values()) if fits else 0.0
    bandwidth = {t: fits[t]["bandwidth"] if t in fits else default_bw[t] for t in TIERS}
    fixed = {t: fits[t]["fixed_s"] if t in fits else mean_fixed for t in TIERS}

    # Decode and prefill, per model.
    decode: dict[str, list[float]] = defaultdict(list)
    prefill: dict[str, list[float]] = defaultdict(list)
    after_load: dict[str, list[float]] = defaultdict(list)
    """Prefill seconds per prompt token of the first requests served by an instance the moment it was ready
    (they waited for its load): the fallback where no warm request found a free slot."""
    for p in policies:
        ok = _ok(replay["records"][p])
        windows = _decoding(ok)
        t0 = clock_offset(replay, p)
        ready = _ready_intervals(replay["events"].get(p, []), t0, set(sizes))
        for m, steps in ready.items():
            before = 0
            for t_ready, count in steps:
                if count > before:
                    waited = sorted((r["arrival_s"] + r["ttft_s"], r) for r in ok if r["model"] == m
                                    and r["arrival_s"] < t_ready < r["arrival_s"] + r["ttft_s"])
                    for first, r in waited[:per_instance.get(m, 1)]:
                        share = _sharing(t_ready, first, m, windows, cores, per_instance.get(m, 1))
                        after_load[m].append((first - t_ready) / share / max(1, r["prompt_tokens"]))
                before = count
        for r in ok:
            m = r["model"]
            if r.get("tokens", 0) >= 2:
                a, b = r["arrival_s"] + r["ttft_s"], r["arrival_s"] + r["latency_s"]
                share = _sharing(a, b, m, windows, cores, per_instance.get(m, 1))
                decode[m].append((r["latency_s"] - r["ttft_s"]) / (r["tokens"] - 1) / share)
            loaded = _loaded_at(ready.get(m, []), r["arrival_s"])
            # Warm and with a free slot: a request that arrived in a burst, every slot of the model's instances
            # taken, waited in the queue before its prefill, and its TTFT says nothing of the prefill's speed.
            ahead = sum(1 for o in ok if o is not r and o["model"] == m
                        and (o["arrival_s"], o["index"]) < (r["arrival_s"], r["index"])
                        and r["arrival_s"] < o["arrival_s"] + o["latency_s"])
            if loaded and ahead < loaded * per_instance.get(m, 1):
                share = _sharing(r["arrival_s"], r["arrival_s"] + r["ttft_s"], m, windows, cores,
                                 per_instance.get(m, 1))
                prefill[m].append(r["ttft_s"] / share / max(1, r["prompt_tokens"]))
    models: dict[str, dict[str, Any]] = {}
    for m, size in sizes.items():
        entry: dict[str, Any] = {"size_bytes": size}
        if decode.get(m):
            entry["decode_s_per_token"] = statistics.median(decode[m])
        if prefill.get(m):
            entry["prefill_s_per_token"] = statistics.median(prefill[m])
        models[m] = entry
    ratios = [e["prefill_s_per_token"] / e["decode_s_per_token"] for e in models.values()
              if "prefill_s_per_token" in e and e.get("decode_s_per_token")]
    prefill_ratio_from = "these runs' warm requests"
    if not ratios and after_load:
        # A run whose every request arrived in a burst (no warm request found a free slot) measured no prefill that
        # way; the simulator's default (a 7B model's on a GPU, 0.2 ms a token) then made its prompts ~10x too fast
        # (the GPU sweep's rayserve-cache run: TTFT and latency 47 % under the real ones). The first requests an
        # instance served when its load ended give it instead.
        for m, values in after_load.items():
            if m in models and "decode_s_per_token" in models[m]:
                models[m]["prefill_s_per_token"] = statistics.median(values)
        ratios = [e["prefill_s_per_token"] / e["decode_s_per_token"] for e in models.values()
                  if "prefill_s_per_token" in e and e.get("decode_s_per_token")]
        prefill_ratio_from = "these runs' first requests after a load (no warm request had a free slot)"
    if not ratios and set(policies) != set(replay["records"]):
        # Nothing measured a prefill in these runs at all: the same engine's prefill-to-decode ratio from the
        # replay's other runs stands in for it, scaled by this run's decode.
        pooled = derive_calibration(replay)
        measured_prefill = pooled["comment"]["prefill_samples"]
        ratios = [e["prefill_s_per_token"] / e["decode_s_per_token"] for m, e in pooled["models"].items()
                  if measured_prefill.get(m) and e.get("decode_s_per_token")]
        prefill_ratio_from = "the replay's other runs (none of these had a warm request with a free slot)"
    for e in models.values():
        if "prefill_s_per_token" not in e and "decode_s_per_token" in e and ratios:
            e["prefill_s_per_token"] = e["decode_s_per_token"] * statistics.median(ratios)
    without = [m for m, e in models.items() if "decode_s_per_token" not in e]
    measured = [e for e in models.values() if "decode_s_per_token" in e]
    if not measured:
        raise ReplayError(f"no completed request with 2 or more tokens for {', '.join(without)}: no decode speed")
    for m in without:
        # A model the workload never asked for (or never finished): its speeds matter to no request; the
        # others' medians keep the configuration whole.
        for key in ("decode_s_per_token", "prefill_s_per_token"):
            values = [e[key] for e in measured if key in e]
            if values:
                models[m][key] = statistics.median(values)

    out: dict[str, Any] = {
        "derived_from": f"replay measurements of {', '.join(policies)}: load events, records' TTFT and "
                        "decode times divided by the sharing they ran under",
        "bandwidth": bandwidth,
        "load_fixed_s": fixed,
        "batch_sharing": 1.0,
        "shared_cores": cores,
        "models": models,
    }
    baseline_fit = None
    if baseline_loads:
        out["baseline"], baseline_fit = _fit_baseline(baseline_loads, default_bw["repository"])
    mig = _migration_fit(replay, policies)
    if mig:
        out["migration"] = mig
    seed = ssd_seed(replay)
    if seed:
        out["initial_ssd"] = seed
    out["comment"] = {"load_fits": fits, "baseline_fit": baseline_fit,
                      "decode_samples": {m: len(v) for m, v in decode.items()},
                      "prefill_from": prefill_ratio_from,
                      "prefill_after_load_samples": {m: len(v) for m, v in after_load.items()},
                      "prefill_samples": {m: len(v) for m, v in prefill.items()}}
    return out


def ssd_seed(replay: dict[str, Any]) -> dict[str, list[str]]:
    """model -> nodes whose SSD tier held its checkpoint when the cluster started (``--ssd-seed``)."""
    seed = (replay.get("setup") or {}).get("ssd_seed") or {}
    if isinstance(seed, dict) and seed and all(isinstance(v, dict) for v in seed.values()):
        # One per policy (each its own cluster, seeded alike; the baselines without a cache seed nothing).
        seed = next((v for v in seed.values() if v), {})
    if not isinstance(seed, dict) or not all(isinstance(v, list) for v in seed.values()):
        raise ReplayError(f"setup.ssd_seed: expected {{model: [node, ...]}}, got {seed!r}")
    sizes = model_bytes(replay)
    topo = _topology(replay)
    nodes = {n.name for n in topo.nodes}
    for model, where in seed.items():
        if model not in sizes or set(where) - nodes:
            raise ReplayError(f"setup.ssd_seed: {model!r} on {where}: not a model of the family on the "
                              f"topology's nodes ({', '.join(sorted(nodes))})")
    return {m: list(v) for m, v in seed.items()}


def _ready_intervals(events: list[dict[str, Any]], t0: float, models: set[str]) -> dict[str, list[tuple[float, int]]]:
    """model -> [(time, instances loaded after it)], from load (+1) and unload (-1) events."""
    steps: dict[str, list[tuple[float, int]]] = defaultdict(list)
    count: dict[str, int] = defaultdict(int)
    for e in sorted(events, key=lambda e: e["time"]):
        m = (e.get("data") or {}).get("model")
        if m not in models:
            continue
        if e["kind"] == "load":
            count[m] += 1
        elif e["kind"] == "unload":
            count[m] = max(0, count[m] - 1)
        else:
            continue
        steps[m].append((e["time"] - t0, count[m]))
    return steps


def _loaded_at(steps: list[tuple[float, int]], t: float) -> int:
    """Instances of the model loaded at ``t`` (0: none)."""
    n = 0
    for when, count in steps:
        if when > t:
            break
        n = count
    return n


def _migration_fit(replay: dict[str, Any], policies: list[str]) -> dict[str, float] | None:
    pairs = []
    for p in policies:
        for r in _ok(replay["records"][p]):
            for m in r.get("migrations") or []:
                tokens, seconds = m.get("tokens_recomputed"), m.get("total_s")
                if m.get("kind") == "migration" and isinstance(tokens, (int, float)) and isinstance(seconds, (int, float)):
                    pairs.append((float(tokens), float(seconds)))
    if not pairs:
        return None
    if len({t for t, _ in pairs}) >= 2:
        mx, my = statistics.fmean(t for t, _ in pairs), statistics.fmean(s for _, s in pairs)
        a = sum((t - mx) * (s - my) for t, s in pairs) / sum((t - mx) ** 2 for t, _ in pairs)
        if a > 0:
            return {"a": a, "b": max(0.0, my - a * mx)}
    return {"a": 0.0, "b": statistics.median(s for _, s in pairs)}


# ---------------------------------------------------------------------------------------------- rebuilding the run


def replay_workload(replay: dict[str, Any], policy: str) -> list[Arrival]:
    """The arrivals the replay sent (every policy got the same; taken from ``policy``'s records)."""
    recs = sorted(replay["records"][policy], key=lambda r: r["arrival_s"])
    return [Arrival(float(r["arrival_s"]), r["model"], int(r["prompt_tokens"]), int(r["output_tokens"])) for r in recs]


def replay_config(replay: dict[str, Any], calibration: dict[str, Any], warmup_bytes: int = WARMUP_BYTES) -> SimConfig:
    """The replay's cluster from its topology text, calibrated; every tier empty at the start but for
    the warm-up model (if the topology lists it) in each node's SSD and DRAM and the ``--ssd-seed``
    checkpoints on the SSDs that held them (from the calibration's ``initial_ssd``, else the replay's
    ``setup.ssd_seed``). The seeded copies are older than the warm-up's in the SSD's LRU order, as in
    the real tier (it finds them at start; the warm-up is stored later)."""
    with tempfile.TemporaryDirectory(prefix="sllm-validate-") as tmp:
        path = Path(tmp) / "topology.yaml"
        path.write_text(topology_text(replay))
        sizes = {**model_bytes(replay), WARMUP_MODEL: warmup_bytes}
        cfg = SimConfig.from_topology(path, model_bytes=sizes, start_tier="repository")
    cfg.load_pipeline = "node"
    names = [s.name for s in cfg.servers]
    if "initial_ssd" not in calibration:
        calibration = {**calibration, "initial_ssd": ssd_seed(replay)}
    cfg = apply_calibration(cfg, calibration)
    if any(m.name == WARMUP_MODEL for m in cfg.models):
        # The warm-up model is the topology's last: _place_checkpoints stores it after the seeded ones.
        cfg.initial_ssd = {**(cfg.initial_ssd or {}), WARMUP_MODEL: names}
        cfg.initial_dram = {WARMUP_MODEL: names}
        cfg.prior_choices = 1  # the warm-up request's placement drew from the scheduler's generator
    return cfg


# ---------------------------------------------------------------------------------------------- comparing


def real_summary(replay: dict[str, Any], policy: str) -> dict[str, Any]:
    ok = _ok(replay["records"][policy])
    loads = {t: 0 for t in TIERS}
    for s in load_samples(replay, policy):
        loads[s["tier"]] += 1
    return {"completed": len(ok), "failed": len(replay["records"][policy]) - len(ok),
            "latency_s": stats([r["latency_s"] for r in ok]), "ttft_s": stats([r["ttft_s"] for r in ok]),
            "loads": loads}


def _rel(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or real == 0:
        return None
    return (sim - real) / real


def validate(replay: dict[str, Any], policies: list[str] | None = None, *, seed: int = 0,
             calibration: dict[str, Any] | None = None, per_policy: bool = False,
             warmup_bytes: int = WARMUP_BYTES) -> dict[str, Any]:
    """Simulate every policy of the replay with a calibration derived from it; real against simulated.

    ``per_policy``: each policy gets a calibration from its own run only (its host's load then), instead
    of one pooled over all runs."""
    policies = policies or list(replay["records"])
    pooled = calibration or derive_calibration(replay)
    rows = []
    for p in policies:
        cal = derive_calibration(replay, [p]) if per_policy and calibration is None else pooled
        cfg = replay_config(replay, cal, warmup_bytes)
        sim = simulate(cfg, replay_workload(replay, p), p, seed).summary()
        real = real_summary(replay, p)
        errors = {f"{metric}.{stat}": _rel(sim[metric][stat], real[metric][stat])
                  for metric in ("latency_s", "ttft_s") for stat in ("mean", "p50", "p99")}
        held = [errors[f"{m}.{s}"] for m, s in HELD]
        rows.append({
            "policy": p, "real": real,
            "sim": {"completed": sim["completed"], "failed": sim["failed"], "latency_s": sim["latency_s"],
                    "ttft_s": sim["ttft_s"], "loads": sim["loads"], "decisions": sim["decisions"],
                    "migrations": sim["migrations"], "preemptions": sim["preemptions"],
                    "estimator": sim["estimator"]},
            "rel_error": errors,
            "pass": all(e is not None and abs(e) <= BAR for e in held),
        })
    return {"bar": BAR, "held": [f"{m}.{s}" for m, s in HELD], "per_policy_calibration": per_policy,
            "seed": seed, "calibration": pooled, "policies": rows,
            "pass": all(r["pass"] for r in rows)}


def _f(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.0%}" if pct else f"{v:.2f}"


def format_report(result: dict[str, Any], markdown: bool = False) -> str:
    head = ["policy", "lat mean real/sim (err)", "lat p50 real/sim (err)", "lat p99 real/sim (err)",
            "TTFT mean real/sim (err)", "TTFT p50 real/sim (err)", "TTFT p99 real/sim (err)",
            "loads dram/ssd/repo real vs sim", "pass"]
    rows = []
    for r in result["policies"]:
        cells = [r["policy"]]
        for metric in ("latency_s", "ttft_s"):
            for stat in ("mean", "p50", "p99"):
                cells.append(f"{_f(r['real'][metric][stat])} / {_f(r['sim'][metric][stat])} "
                             f"({_f(r['rel_error'][f'{metric}.{stat}'], True)})")
        rl, sl = r["real"]["loads"], r["sim"]["loads"]
        cells.append(f"{rl['dram']}/{rl['ssd']}/{rl['repository']} vs {sl['dram']}/{sl['ssd']}/{sl['repository']}")
        cells.append("yes" if r["pass"] else "NO")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c) + " |" for c in rows]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
