"""``sllm simulate``: a discrete-event simulation of the scheduler on a virtual clock.

The cluster is N servers of G GPUs each; every server has a DRAM tier and an SSD tier (LRU, of given
capacity and bandwidth) and reaches a model repository at a given bandwidth. The placement steps are the
SchedulerActor's own: one :class:`~sllm_actors.policy.steps.PlacementSteps` (which calls
:func:`~sllm_actors.policy.placement.choose` over :class:`~sllm_actors.policy.placement.GpuView` objects
kept up to date incrementally here) decides, and this simulation carries out its actions on a virtual
clock, so the policies compared here are the code that runs in the real cluster.

What the steps decide, and how it is simulated:

* a request goes to the ready instance of its model with room (fewest requests first); else it waits on
  an instance that is loading, or on a GPU reserved for its model; else ``choose()`` decides:
  ``load`` (unload the listed idle instances, load from the node's fastest tier holding the model, then
  serve), ``migrate`` (ServerlessLLM: each busy instance's requests keep decoding while the destination
  loads their model if needed and recomputes their tokens, ``a * tokens + b`` seconds; then they switch,
  losing nothing; once the GPU has no request left the new model loads there), ``preempt`` (Shepherd:
  the busy instance stops at once and its requests are placed again from scratch, their progress lost;
  the new model loads at once), or ``wait`` (queue; a request queued longer than ``queue_timeout_s``
  fails). A move that cannot start gives the GPU's reservation up and its waiters queue. The queue is
  retried whenever a request finishes or an instance becomes ready.
* an idle instance is unloaded ``keep_alive_s`` after its last request; a model keeps at most
  ``max_instances`` instances of ``max_concurrency`` requests each.
* a load from the SSD tier puts the model in DRAM too; from the repository, in SSD and DRAM (LRU
  eviction in each tier). Initially each checkpoint sits on the SSD of ``replicas`` servers
  (round-robin), none in DRAM.

Costs, all calibration parameters (see :func:`load_calibration`): load = size / bandwidth of the tier
used, loads on one GPU run one after another (the estimator's queue term); prefill = prompt tokens x
``prefill_s_per_token`` (the first token comes at its end), then ``decode_s_per_token`` per further
token. Requests on one instance share it: with ``n`` running each advances at ``1 / (1 + k (n - 1))``,
``k = batch_sharing`` (0: perfect batching, a GPU; 1: one request at a time, the CPU actor stepping
each request in turn). Unloading is instant. Two calibrated refinements, both off by default:
``load_fixed_s`` adds a fixed time per load from each tier (building the model, starting its actor:
what dominates small models' loads; the scheduler's estimator learns it too, so the simulated
estimator is given its mean), and ``shared_cores`` > 0 makes every instance of the cluster one thread on
a host of that many cores (the replay's CPU "GPUs" all run on one machine): with ``A`` instances
decoding, each advances at ``min(1, shared_cores / A)`` on top of the sharing inside it. ``cpu_devices``
makes the devices ``cpu`` ones for placement as well: a load is slowed by the instances decoding on its node,
as the placement estimate (``CPU_CONTENTION``) says.

Use::

    from sllm_eval.simulator import SimConfig, simulate
    from sllm_eval.workload import gamma_workload
    cfg = SimConfig.cluster(servers=250, gpus_per_server=4, models=1000)
    work = gamma_workload(cfg.model_names(), rps=50, cv=2, duration_s=600, seed=0)
    print(simulate(cfg, work, "serverlessllm", seed=0).summary())

or ``sllm simulate --servers 250 --gpus-per-server 4 --models 1000 --policy all --rps 50 --cv 2
--duration 600 --seed 0`` (``python -m sllm_eval.simulator`` takes the same arguments).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sllm_actors.policy import placement, steps
from sllm_actors.policy.placement import Estimator, GpuView, InstanceView, MigrationCost, RunningView
from sllm_eval.stats import stats
from sllm_eval.workload import Arrival

__all__ = [
    "BASELINES",
    "CHOICES",
    "POLICIES",
    "TIERS",
    "BaselineCosts",
    "ModelConfig",
    "ServerConfig",
    "SimConfig",
    "apply_calibration",
    "build_parser",
    "config_from_args",
    "format_table",
    "load_calibration",
    "main",
    "simulate",
    "workload_from_args",
]

POLICIES = ("serverlessllm", "shepherd", "locality-wait", "availability", "random")
BASELINES = {"rayserve": "availability", "rayserve-cache": "availability", "kserve": "availability"}
"""The paper's baselines as the replay runs them (``sllm_eval.replay.BASELINES``): the placement policy each maps
to and a load mode of its own (:class:`BaselineCosts`): no storage tier of ours, a download from the repository
at every cold start (``rayserve-cache``: unless the node kept a copy) and ``from_pretrained``."""
CHOICES = (*POLICIES, *BASELINES)
"""What ``simulate`` and ``--policy`` take: the placement policies and the baselines."""
TIERS = ("dram", "ssd", "repository")
GB = 1000**3
GiB = 1024**3
_EPS = 1e-9


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SizeClass:
    """Defaults for the models of one size; calibration files override them by class name."""

    size_bytes: int
    prefill_s_per_token: float
    decode_s_per_token: float
    migration_a: float
    migration_b: float


SIZE_CLASSES: dict[str, SizeClass] = {
    # The real default model on a CPU "GPU" (538 MB converted checkpoint), one request at a time.
    "135m": SizeClass(538_062_848, 4e-4, 0.03, 4e-4, 0.05),
    # fp16 checkpoints on an H100-class GPU: prefill at roughly 5k/3k/1.5k tokens/s, decode 15/25/50 ms.
    "7b": SizeClass(13_500_000_000, 2e-4, 0.015, 2e-4, 0.05),
    "13b": SizeClass(26_000_000_000, 3.3e-4, 0.025, 3.3e-4, 0.08),
    "30b": SizeClass(60_000_000_000, 7e-4, 0.05, 7e-4, 0.15),
}


@dataclass
class ModelConfig:
    name: str
    size_bytes: int
    """Checkpoint bytes: what a load reads. The GPU holds ``size_bytes * load_overhead``."""
    size_class: str = ""
    prefill_s_per_token: float = 2e-4
    decode_s_per_token: float = 0.015
    migration_a: float = 5e-4
    migration_b: float = 0.05
    keep_alive_s: float = 30.0
    max_concurrency: int = 4
    max_instances: int = 8

    @staticmethod
    def of_class(name: str, size_class: str, **kw: Any) -> ModelConfig:
        c = SIZE_CLASSES[size_class]
        return ModelConfig(name, c.size_bytes, size_class, c.prefill_s_per_token, c.decode_s_per_token,
                           c.migration_a, c.migration_b, **kw)


@dataclass
class ServerConfig:
    name: str
    gpu_memory: list[int]
    dram_bytes: int
    ssd_bytes: int
    bandwidth: dict[str, float]
    """tier -> bytes/s for a load from that tier to one of this server's GPUs (dram, ssd, repository)."""


@dataclass
class BaselineCosts:
    """What a baseline's cold start costs beyond its download (``actors/node/baseline_loader.py``): ``from_pretrained``
    reads the local safetensors copy at ``hf_bandwidth`` bytes/s plus ``hf_fixed_s`` (building the model, the
    tokenizer parsed afresh), and ``kserve`` first starts a server process, ``process_start_s``. The download runs
    at the repository's bandwidth, one at a time per node; a kept copy (``rayserve-cache``) is read at the SSD's.
    Defaults are guesses until a replay's loads calibrate them (``benchmarks/validate_simulator.py``)."""

    hf_bandwidth: float = 2e9
    hf_fixed_s: float = 1.0
    process_start_s: float = 5.0
    download_bandwidth: float = 0.0
    """bytes/s of a download (the topology's repository link); 0: the server's repository tier bandwidth."""


@dataclass
class SimConfig:
    servers: list[ServerConfig]
    models: list[ModelConfig]
    replicas: int = 2
    """Initial checkpoint copies per model, on the SSDs of servers chosen round-robin."""
    queue_timeout_s: float = 120.0
    migration: bool = True
    """The topology's ``scheduler: migration`` (false: serverlessllm places like locality-wait)."""
    load_overhead: float = 1.15
    """GPU bytes per checkpoint byte (activations, KV cache): the scheduler's LOAD_OVERHEAD."""
    batch_sharing: float = 0.0
    load_fixed_s: dict[str, float] = field(default_factory=dict)
    """tier -> seconds a load from that tier costs beyond size / bandwidth (default 0)."""
    shared_cores: float = 0.0
    """> 0: all GPUs are threads on one host of this many cores (CPU devices); 0: GPUs are independent."""
    initial_ssd: dict[str, list[str]] | None = None
    """model -> server names holding its checkpoint on SSD at the start (replaces ``replicas``)."""
    initial_dram: dict[str, list[str]] | None = None
    """model -> server names holding it in DRAM at the start (default none)."""
    initial_instances: list[tuple[str, str]] = field(default_factory=list)
    """(model, server name): instances ready at time 0 on the first GPU of that server with room (like
    the scheduler's ``min_instances``; they go after ``keep_alive_s`` idle like any other)."""
    check_invariants: bool = False
    """Check memory and bookkeeping after every event (slow; for tests)."""
    cpu_devices: bool = False
    """The devices are ``cpu`` ones, threads of their node's process sharing its host's cores (the real scheduler's
    CPU "GPUs"): placement sees them as ``cpu`` (a load's estimate grows with the instances decoding on its node,
    ``placement.CPU_CONTENTION``) and a simulated load is slowed the same way, by the instances decoding on its
    node when it starts. Off: independent GPUs (decode sharing is ``shared_cores``' alone)."""
    load_pipeline: str = "gpu"
    """How loads wait for each other. ``gpu``: the loads on one GPU run one after another, each taking
    its whole cost. ``node``: what a real node does (``storage_client.py``): repository fetches on a node
    run one at a time (one repository tier actor per node; a fetch includes the store into SSD), and
    building the model on the device takes a node-wide lock, so builds take turns; a DRAM or SSD load
    waits only for builds, never for a fetch under way. The build costs what a DRAM load does (size /
    DRAM bandwidth + its fixed time); a fetch, the rest of the repository load's cost; an SSD load
    holds the lock for the build and then sleeps to its tier's bandwidth outside it."""
    prior_choices: int = 0
    """Placement decisions the real scheduler made before the workload began (a replay's warm-up request is
    placed once, over every GPU): ``random``'s generator makes that many choices over all GPUs first, so
    that a replay's random choices are reproduced (the SchedulerActor seeds ``Random(0)`` too)."""
    record_log: bool = False
    """Keep a log of schedule decisions, loads, unloads and tier evictions (``SimResult.log``), in the
    shape of the real cluster's events, to compare a simulated run with a replay decision by decision."""
    baseline: BaselineCosts = field(default_factory=BaselineCosts)
    """The baselines' load costs (used only under a ``BASELINES`` name)."""

    def model_names(self) -> list[str]:
        """Model names in popularity order (``models[0]`` is the workload's rank 1)."""
        return [m.name for m in self.models]

    @property
    def gpu_count(self) -> int:
        return sum(len(s.gpu_memory) for s in self.servers)

    @staticmethod
    def cluster(servers: int = 250, gpus_per_server: int = 4, models: int = 1000, *,
                gpu_memory: int = 80 * GiB, dram_bytes: int = 512 * GB, ssd_bytes: int = 4000 * GB,
                bandwidth: dict[str, float] | None = None, size_mix: dict[str, float] | None = None,
                keep_alive_s: float = 30.0, max_concurrency: int = 8, max_instances: int = 32,
                replicas: int = 2, queue_timeout_s: float = 120.0, batch_sharing: float = 0.0,
                seed: int = 0) -> SimConfig:
        """A uniform GPU cluster. Model sizes follow ``size_mix`` (class -> share, spread evenly over
        the popularity ranks, deterministically from ``seed``).

        Defaults: 80 GiB GPUs, 512 GB DRAM and 4 TB SSD a server; DRAM 20 GB/s and SSD 2 GB/s (the
        ANCHORS ceilings: pinned copy ~55 GB/s shared by the GPUs of a server, cold disk ~2 GB/s), a
        repository at 0.5 GB/s; half 7B, 30 % 13B, 20 % 30B models; 8 requests an instance (batched
        for free: ``batch_sharing`` 0), at most 32 instances a model, keep-alive 30 s.
        """
        bw = {"dram": 20e9, "ssd": 2e9, "repository": 0.5e9, **(bandwidth or {})}
        mix = size_mix or {"7b": 0.5, "13b": 0.3, "30b": 0.2}
        names = list(mix)
        weights = [mix[n] for n in names]
        rng = random.Random(seed)
        classes = rng.choices(names, weights, k=models)
        width = len(str(models - 1))
        return SimConfig(
            servers=[ServerConfig(f"server-{i:0{len(str(servers - 1))}d}", [gpu_memory] * gpus_per_server,
                                  dram_bytes, ssd_bytes, dict(bw)) for i in range(servers)],
            models=[ModelConfig.of_class(f"model-{k:0{width}d}-{c}", c, keep_alive_s=keep_alive_s,
                                         max_concurrency=max_concurrency, max_instances=max_instances)
                    for k, c in enumerate(classes)],
            replicas=replicas, queue_timeout_s=queue_timeout_s, batch_sharing=batch_sharing,
        )

    @staticmethod
    def small_cpu(models: dict[str, int] | None = None, *, keep_alive_s: float = 300.0,
                  queue_timeout_s: float = 120.0, bandwidth: dict[str, float] | None = None,
                  batch_sharing: float = 1.0, start_tier: str = "ssd") -> SimConfig:
        """The default ``topology.yaml``: 2 nodes, each one ``cpu`` device of 3 GiB, DRAM 4 GiB, SSD 20 GiB;
        the default model (smollm2-135m, a 538 MB checkpoint), keep-alive 5 min, queue timeout 2 min.
        Bandwidths are the scheduler's defaults until a calibration says otherwise. ``start_tier`` says
        where each node has every model at time 0: ``ssd`` (its SSD tier directory kept from an earlier
        run), ``dram`` (SSD and DRAM), or ``repository`` (a fresh node: nothing local)."""
        if start_tier not in TIERS:
            raise ValueError(f"start_tier must be one of {TIERS}, got {start_tier!r}")
        models = models or {"smollm2-135m": SIZE_CLASSES["135m"].size_bytes}
        bw = {**placement.DEFAULT_BANDWIDTH, **(bandwidth or {})}
        servers = [ServerConfig(f"node-{i}", [3 * GiB], 4 * GiB, 20 * GiB, dict(bw)) for i in (1, 2)]
        cfg = []
        for name, size in models.items():
            m = ModelConfig.of_class(name, "135m", keep_alive_s=keep_alive_s)
            m.size_bytes = size
            cfg.append(m)
        everywhere = {m.name: [s.name for s in servers] for m in cfg}
        return SimConfig(servers, cfg, replicas=2, queue_timeout_s=queue_timeout_s, batch_sharing=batch_sharing,
                         initial_ssd=everywhere if start_tier != "repository" else {},
                         initial_dram=everywhere if start_tier == "dram" else None)

    @staticmethod
    def from_topology(path: str | Path, model_bytes: dict[str, int] | None = None,
                      size_class: str = "135m", start_tier: str = "ssd") -> SimConfig:
        """Servers, tiers and models of a ``topology.yaml``; model sizes from ``model_bytes`` (else the
        class's; a calibration's ``models.NAME.size_bytes`` also sets them). Bandwidths not in the
        topology are the scheduler's defaults. ``start_tier`` as in :meth:`small_cpu`."""
        if start_tier not in TIERS:
            raise ValueError(f"start_tier must be one of {TIERS}, got {start_tier!r}")
        from sllm_actors.runtime.topology import load_topology

        topo = load_topology(path)
        servers = []
        for n in topo.nodes:
            bw = dict(placement.DEFAULT_BANDWIDTH)
            if n.ssd_bandwidth:
                bw["ssd"] = float(n.ssd_bandwidth)
            if n.repository_bandwidth:
                bw["repository"] = float(n.repository_bandwidth)
            servers.append(ServerConfig(n.name, [g.memory_bytes for g in n.gpus], n.dram_bytes, n.ssd_bytes, bw))
        models = []
        for spec in topo.models:
            m = ModelConfig.of_class(spec.name, size_class, keep_alive_s=spec.keep_alive_s,
                                     max_concurrency=spec.target_concurrency, max_instances=spec.max_instances)
            if model_bytes and spec.name in model_bytes:
                m.size_bytes = int(model_bytes[spec.name])
            models.append(m)
        everywhere = {m.name: [s.name for s in servers] for m in models}
        return SimConfig(servers, models, queue_timeout_s=topo.scheduler.queue_timeout_s, batch_sharing=1.0,
                         migration=topo.scheduler.migration,
                         initial_ssd=everywhere if start_tier != "repository" else {},
                         initial_dram=everywhere if start_tier == "dram" else None)

    def calibrated(self, calibration: dict[str, Any]) -> SimConfig:
        """A copy with a calibration applied (see :func:`load_calibration` for the keys)."""
        return apply_calibration(self, calibration)


_MODEL_KEYS = {"size_bytes", "prefill_s_per_token", "decode_s_per_token", "migration", "keep_alive_s",
               "max_concurrency", "max_instances", "size_class"}
_TOP_KEYS = {"bandwidth", "prefill_s_per_token", "decode_s_per_token", "migration", "batch_sharing",
             "load_overhead", "queue_timeout_s", "size_classes", "models", "comment", "load_fixed_s",
             "shared_cores", "derived_from", "initial_ssd", "baseline"}


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read and check a calibration JSON file. Every key is optional::

        {
          "bandwidth": {"dram": 5e9, "ssd": 1e9, "repository": 1e8},   # bytes/s, every server
          "prefill_s_per_token": 0.0004, "decode_s_per_token": 0.03,    # every model...
          "migration": {"a": 0.0005, "b": 0.05},                        # resume cost a * tokens + b seconds
          "batch_sharing": 1.0, "load_overhead": 1.15, "queue_timeout_s": 120,
          "load_fixed_s": {"dram": 2.0, "ssd": 2.5, "repository": 3.0},  # seconds a load costs beyond bytes
          "shared_cores": 2,                                            # instances share a host's cores
          "initial_ssd": {"llama-50mb": ["node-1"]},                    # checkpoints on SSDs at time 0
          "size_classes": {"7b": {"decode_s_per_token": 0.02, "migration": {"a": 2e-4, "b": 0.06}}},
          "models": {"smollm2-135m": {"size_bytes": 538062848, "decode_s_per_token": 0.028}}
        }

    Precedence: ``models[name]`` over ``size_classes[model's class]`` over the top level. A model entry
    may also set ``keep_alive_s``, ``max_concurrency``, ``max_instances`` and ``size_class``.
    ``comment`` and ``derived_from`` (free text, e.g. what measurements produced the file) are ignored.
    ``initial_ssd`` (model -> server names, e.g. a replay's ``--ssd-seed`` placement) puts those models'
    checkpoints on those servers' SSD tiers at the start, in place of where the configuration put them
    (a configuration that placed ``replicas`` round-robin gets exactly the listed copies instead).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the calibration: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    _check_calibration(data, str(path))
    return data


def _check_calibration(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object")  # noqa: TRY004 (a bad file, as any other)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    bw = data.get("bandwidth", {})
    if not isinstance(bw, dict) or set(bw) - set(TIERS) or not all(_positive(v) for v in bw.values()):
        raise ValueError(f"{where}: bandwidth: expected {{tier: positive bytes/s}} with tiers {TIERS}, got {bw!r}")
    fixed = data.get("load_fixed_s", {})
    if not isinstance(fixed, dict) or set(fixed) - set(TIERS) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in fixed.values()):
        raise ValueError(f"{where}: load_fixed_s: expected {{tier: seconds >= 0}} with tiers {TIERS}, got {fixed!r}")
    cores = data.get("shared_cores", 0)
    if not isinstance(cores, (int, float)) or isinstance(cores, bool) or cores < 0:
        raise ValueError(f"{where}: shared_cores: expected a number >= 0 (0: off), got {cores!r}")
    for key in ("prefill_s_per_token", "decode_s_per_token", "batch_sharing", "load_overhead", "queue_timeout_s"):
        if key in data and not (isinstance(data[key], (int, float)) and not isinstance(data[key], bool)
                                and data[key] >= 0):
            raise ValueError(f"{where}: {key}: expected a number >= 0, got {data[key]!r}")
    for group in ("size_classes", "models"):
        entries = data.get(group, {})
        if not isinstance(entries, dict):
            raise ValueError(f"{where}: {group}: expected an object")  # noqa: TRY004
        for name, entry in entries.items():
            if not isinstance(entry, dict) or set(entry) - _MODEL_KEYS:
                raise ValueError(f"{where}: {group}.{name}: expected an object with keys from {sorted(_MODEL_KEYS)}")
            _check_migration(entry.get("migration"), f"{where}: {group}.{name}.migration")
    _check_migration(data.get("migration"), f"{where}: migration")
    base = data.get("baseline", {})
    fields = {"hf_bandwidth", "hf_fixed_s", "process_start_s", "download_bandwidth"}
    if not isinstance(base, dict) or set(base) - fields or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in base.values()) \
            or base.get("hf_bandwidth", 1) <= 0:
        raise ValueError(f"{where}: baseline: expected {{{', '.join(sorted(fields))}: numbers >= 0}}, got {base!r}")
    seed = data.get("initial_ssd", {})
    if not isinstance(seed, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in seed.values()):
        raise ValueError(f"{where}: initial_ssd: expected {{model: [server name, ...]}}, got {seed!r}")


def _check_migration(m: Any, where: str) -> None:
    if m is None:
        return
    if not isinstance(m, dict) or set(m) - {"a", "b"} or not all(isinstance(v, (int, float)) and v >= 0
                                                                   for v in m.values()):
        raise ValueError(f"{where}: expected {{\"a\": s/token, \"b\": s}}, got {m!r}")


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def apply_calibration(config: SimConfig, calibration: dict[str, Any]) -> SimConfig:
    _check_calibration(calibration, "calibration")
    c = calibration
    servers = [replace(s, bandwidth={**s.bandwidth, **c.get("bandwidth", {})}) for s in config.servers]
    classes = c.get("size_classes", {})
    per_model = c.get("models", {})
    models = []
    for m in config.models:
        m = replace(m)
        layers = [c, classes.get(per_model.get(m.name, {}).get("size_class", m.size_class), {}),
                  per_model.get(m.name, {})]
        for layer in layers:
            for key in ("prefill_s_per_token", "decode_s_per_token", "keep_alive_s"):
                if key in layer:
                    setattr(m, key, float(layer[key]))
            for key in ("max_concurrency", "max_instances", "size_bytes"):
                if key in layer and layer is not c:
                    setattr(m, key, int(layer[key]))
            if "size_class" in layer and layer is not c:
                m.size_class = str(layer["size_class"])
            mig = layer.get("migration")
            if mig:
                m.migration_a = float(mig.get("a", m.migration_a))
                m.migration_b = float(mig.get("b", m.migration_b))
        models.append(m)
    out = replace(config, servers=servers, models=models,
                  load_fixed_s={**config.load_fixed_s, **{t: float(v) for t, v in c.get("load_fixed_s", {}).items()}})
    for key in ("batch_sharing", "load_overhead", "queue_timeout_s", "shared_cores"):
        if key in c:
            setattr(out, key, float(c[key]))
    if c.get("baseline"):
        out.baseline = replace(out.baseline, **{k: float(v) for k, v in c["baseline"].items()})
    if c.get("initial_ssd"):
        names = {s.name for s in out.servers}
        models = {m.name for m in out.models}
        for model, where in c["initial_ssd"].items():
            bad = [n for n in where if n not in names]
            if model not in models or bad:
                raise ValueError(f"calibration: initial_ssd: {model!r} on {where}: "
                                 + (f"no server {', '.join(bad)}" if bad else "no such model in the configuration"))
        out.initial_ssd = {**(out.initial_ssd or {}), **{m: list(v) for m, v in c["initial_ssd"].items()}}
    return out


# ---------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class RequestRecord:
    index: int
    """Position in the workload as given."""
    model: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    status: str
    """``done`` or ``failed``."""
    finish_s: float
    """Completion (or failure) time."""
    ttft_s: float | None
    """Arrival to first token (the first ever, if the request was restarted)."""
    cold_tier: str
    """Tier of the load this request waited for (``dram``, ``ssd``, ``repository``), ``''`` if none."""
    migrations: int
    preemptions: int
    server: str = ""
    """Server it completed on."""
    error: str = ""

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s


def estimate_errors(estimates: Sequence[tuple[str, float, float]]) -> dict[str, Any]:
    """Start-up estimates against their loads' times: count, mean relative and absolute error, by tier."""
    def errors(rows: Sequence[tuple[str, float, float]]) -> dict[str, Any]:
        timed = [(e, m) for _, e, m in rows if m > 0]
        if not timed:
            return {"count": 0, "mean_rel_error": None, "mean_abs_rel_error": None, "mean_abs_error_s": None}
        return {"count": len(timed), "mean_rel_error": sum((e - m) / m for e, m in timed) / len(timed),
                "mean_abs_rel_error": sum(abs(e - m) / m for e, m in timed) / len(timed),
                "mean_abs_error_s": sum(abs(e - m) for e, m in timed) / len(timed)}

    out = errors(estimates)
    out["by_tier"] = {tier: errors([r for r in estimates if r[0] == tier]) for tier in sorted({r[0] for r in estimates})}
    return out


@dataclass
class SimResult:
    policy: str
    seed: int
    requests: list[RequestRecord]
    loads: dict[str, int]
    """Instance loads by tier (cold starts of instances, migration destinations included)."""
    decisions: dict[str, int]
    """choose() outcomes by kind."""
    migrations: int
    """Requests moved by a migration."""
    preemptions: int
    """Requests restarted from scratch by a preemption."""
    gpu_busy_s: float
    """GPU-seconds with at least one request running on the GPU."""
    gpu_load_s: float
    """GPU-seconds spent loading checkpoints."""
    gpus: int
    makespan_s: float
    events: int
    wall_s: float
    estimates: list[tuple[str, float, float]] = field(default_factory=list)
    """(tier, estimated, simulated seconds) of each load that a placement decision estimated, from its order
    to its end (queue waits in it), as the real scheduler's ``estimate`` events measure them."""
    log: list[dict[str, Any]] = field(default_factory=list)
    """With ``SimConfig.record_log``: ``{"time", "kind", ...}`` per schedule decision (``request``, ``model``,
    ``decision``, ``node``, ``tier``, ``estimate_s``), load (``node``, ``model``, ``tier``, ``seconds``; logged
    at its end like the real ``load`` event), unload and evict (``node``, ``tier``, ``model``)."""

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.requests if r.status == "done"]
        cold: dict[str, int] = {t: 0 for t in TIERS}
        for r in self.requests:
            if r.cold_tier:
                cold[r.cold_tier] += 1
        return {
            "policy": self.policy,
            "seed": self.seed,
            "requests": len(self.requests),
            "completed": len(done),
            "failed": len(self.requests) - len(done),
            "latency_s": stats([r.latency_s for r in done]),
            "ttft_s": stats([r.ttft_s for r in done if r.ttft_s is not None]),
            "cold_starts": cold,
            "warm_starts": sum(1 for r in self.requests if not r.cold_tier),
            "loads": dict(self.loads),
            "migrations": self.migrations,
            "preemptions": self.preemptions,
            "decisions": dict(self.decisions),
            "gpus": self.gpus,
            "gpu_busy_s": self.gpu_busy_s,
            "gpu_load_s": self.gpu_load_s,
            "gpu_utilization": self.gpu_busy_s / (self.gpus * self.makespan_s) if self.makespan_s > 0 else 0.0,
            "makespan_s": self.makespan_s,
            "estimator": estimate_errors(self.estimates),
            "events": self.events,
            "wall_s": self.wall_s,
        }


# ---------------------------------------------------------------------------------------------- state

_ARRIVE, _LOADED, _STEP, _SWITCH, _KEEPALIVE, _TIMEOUT, _REPLACE, _FETCHED = range(8)


class _Req:
    __slots__ = (
        "arrival",
        "cold_tier",
        "error",
        "finish",
        "first_token",
        "idx",
        "inst",
        "migrations",
        "model",
        "order",
        "output",
        "preemptions",
        "prefill_left",
        "prompt",
        "queue_token",
        "queued_since",
        "rv",
        "server",
        "spec",
        "status",
        "work_left",
    )

    def __init__(self, idx: int, a: Arrival, spec: ModelConfig) -> None:
        self.idx = idx
        self.arrival = a.time_s
        self.model = a.model
        self.prompt = max(1, int(a.prompt_tokens))
        self.output = max(1, int(a.output_tokens))
        self.spec = spec
        self.inst: _Inst | None = None
        self.first_token: float | None = None
        self.finish = 0.0
        self.status = "pending"
        self.cold_tier = ""
        self.migrations = 0
        self.preemptions = 0
        self.queued_since: float | None = None
        self.queue_token = 0
        self.rv = RunningView(str(idx), self.prompt)
        self.order: _Order | None = None
        self.error = ""
        self.server = ""
        self.restart()

    def __str__(self) -> str:
        """Its id in the views ``choose`` reads (``RunningView.request_id``): how a split move names it."""
        return self.rv.request_id

    def restart(self) -> None:
        """From scratch: prefill the prompt, then decode the rest."""
        self.prefill_left = self.prompt * self.spec.prefill_s_per_token
        self.work_left = self.prefill_left + (self.output - 1) * self.spec.decode_s_per_token

    def tokens(self) -> int:
        """Prompt plus tokens generated so far (what a migration recomputes)."""
        if self.prefill_left > _EPS:
            return self.prompt
        d = self.spec.decode_s_per_token
        gen = 1 + (int(-self.prefill_left / d + _EPS) if d > 0 else self.output)
        return self.prompt + min(gen, self.output)


class _Inst(steps.Instance):
    """An instance as the placement steps see it (its ``requests`` are the :class:`_Req` running on it), with
    what the simulation adds: its GPU, its view for ``choose`` (kept in step with its state) and progress."""

    __slots__ = (
        "_draining",
        "_state",
        "device",
        "epoch",
        "orders",
        "parts",
        "spec",
        "started",
        "t_last",
        "tier",
        "view",
    )

    def __init__(self, iid: str, spec: ModelConfig, device: _Gpu, mem: int, now: float) -> None:
        self._state = "loading"
        self._draining = False
        self.view = InstanceView(iid, spec.name, "loading", [], mem, spec.max_concurrency)
        super().__init__(iid, spec.name, device.view.node, device.view.gpu, mem, now)
        self.spec = spec
        self.device = device
        self.orders: list[_Order] = []
        """Migrations waiting for this (loading) destination."""
        self.epoch = 0
        self.t_last = now
        self.started = now
        self.parts = (0.0, 0.0, 0.0)
        """Its own load's estimated (fetch, build, tail), as the real scheduler keeps them: its node's queue
        term for other loads replays them (``load_pipeline`` ``node``)."""
        self.tier = ""

    # The placement steps set these; the view ``choose`` reads follows them.
    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        self.sync_view()

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        self.sync_view()

    def sync_view(self) -> None:
        if self._draining:
            self.view.state = "draining"
        elif self._state == "loading":
            self.view.state = "loading"
        elif self.incoming:
            self.view.state = "migrating"  # holds room for requests on their way: neither idle nor movable
        else:
            self.view.state = "ready"

    def idle(self) -> bool:
        return steps.PlacementSteps.is_idle(self)


@dataclass
class _Order:
    source: _Inst
    dest: _Inst
    requests: list[_Req]


class _View(GpuView):
    """A GpuView whose derived fields are kept up to date by the simulator rather than recomputed on
    every access: ``key``, ``used`` and ``free`` are plain attributes (shadowing the base class's
    properties), ``best_tier`` reads the server's model -> fastest tier map. Same values as GpuView's
    own accessors (``_check`` compares them), so ``choose`` decides exactly as on plain views."""

    key = None  # type: ignore[assignment]
    used = 0  # type: ignore[assignment]
    free = 0  # type: ignore[assignment]

    def __init__(self, node: str, gpu: int, memory_total: int, tiers: dict[str, float],
                 holds: dict[str, set[str]], tier_of: dict[str, str]) -> None:
        super().__init__(node, gpu, memory_total, [], tiers=tiers, holds=holds)
        self.key = (node, gpu)
        self.used = 0
        self.free = memory_total
        self._tier_of = tier_of

    def best_tier(self, model: str) -> str:
        return self._tier_of.get(model, "repository")

    def bandwidth(self, tier: str) -> float:
        return self.tiers[tier]


class _Gpu:
    __slots__ = ("active", "busy_s", "busy_since", "index", "insts", "load_free_at", "server", "view")

    def __init__(self, index: int, server: _Server, gpu: int, memory: int, insts: list[_Inst]) -> None:
        self.index = index
        self.server = server
        self.view = _View(server.name, gpu, memory, server.bandwidth, server.holds, server.tier_of)
        self.insts = insts
        """The placement steps' list of the instances on this GPU (they add and remove them)."""
        self.load_free_at = 0.0
        self.active = 0
        self.busy_since = 0.0
        self.busy_s = 0.0

    def free(self) -> int:
        return self.view.free

    def add(self, inst: _Inst) -> None:
        """``inst`` (counted here by the placement steps) takes its room in the view."""
        self.view.instances.append(inst.view)
        self.view.used += inst.memory_bytes
        self.view.free -= inst.memory_bytes

    def remove(self, inst: _Inst) -> None:
        self.view.instances.remove(inst.view)
        self.view.used -= inst.memory_bytes
        self.view.free += inst.memory_bytes


class _Lru:
    def __init__(self, capacity: int, held: set[str], on_change: Any, on_evict: Any = None) -> None:
        self.on_evict = on_evict
        self.capacity = capacity
        self.items: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        self.held = held
        self.on_change = on_change

    def touch(self, model: str) -> None:
        if model in self.items:
            self.items.move_to_end(model)

    def put(self, model: str, size: int) -> None:
        if model in self.items:
            self.items.move_to_end(model)
            return
        if size > self.capacity:
            return
        while self.used + size > self.capacity:
            old, old_size = self.items.popitem(last=False)
            self.used -= old_size
            self.held.discard(old)
            if self.on_evict is not None:
                self.on_evict(old)
            self.on_change(old)
        self.items[model] = size
        self.used += size
        self.held.add(model)
        self.on_change(model)


class _Server:
    def __init__(self, index: int, cfg: ServerConfig, on_drop: Any, log: Any = None) -> None:
        self.fetch_free_at = 0.0
        self.build_free_at = 0.0
        self.index = index
        self.name = cfg.name
        self.bandwidth = {t: float(cfg.bandwidth.get(t) or placement.DEFAULT_BANDWIDTH[t]) for t in TIERS}
        self.holds: dict[str, set[str]] = {"dram": set(), "ssd": set()}
        self.tier_of: dict[str, str] = {}
        """model -> fastest tier holding it here (what GpuView.best_tier finds in ``holds``)."""
        evict = (lambda tier: lambda m: log("evict", node=cfg.name, tier=tier, model=m)) if log else (lambda tier: None)
        self.dram = _Lru(cfg.dram_bytes, self.holds["dram"], self._changed, evict("dram"))
        self.ssd = _Lru(cfg.ssd_bytes, self.holds["ssd"], self._changed, evict("ssd"))
        self.kept = _Lru(cfg.ssd_bytes, set(), lambda model: None)
        """``rayserve-cache``'s safetensors copies on this node's disk (LRU; none of our tiers sees them)."""
        self.gpus: list[_Gpu] = []
        self.on_drop = on_drop

    def _changed(self, model: str) -> None:
        if model in self.holds["dram"]:
            self.tier_of[model] = "dram"
        elif model in self.holds["ssd"]:
            self.tier_of[model] = "ssd"
        else:
            self.tier_of.pop(model, None)
            self.on_drop(self, model)


# ---------------------------------------------------------------------------------------------- engine


class _Sim:
    def __init__(self, config: SimConfig, workload: Sequence[Arrival], policy: str, seed: int) -> None:
        if policy not in CHOICES:
            raise ValueError(f"unknown policy {policy!r} (choose from {', '.join(CHOICES)})")
        self.cfg = config
        self.load_mode = policy if policy in BASELINES else "serverlessllm"
        self.name = policy
        """What the result is labelled (a baseline's name, not its placement policy's)."""
        policy = BASELINES.get(policy, policy)
        self.policy = policy
        self.seed = seed
        self.rng = random.Random(seed)
        self.specs = {m.name: m for m in config.models}
        if len(self.specs) != len(config.models):
            raise ValueError("model names must be unique")
        self.need = {m.name: int(m.size_bytes * config.load_overhead) for m in config.models}
        self.est = Estimator({m.name: m.size_bytes for m in config.models},
                             {m.name: MigrationCost(m.migration_a, m.migration_b) for m in config.models})
        if config.load_fixed_s:
            # The real scheduler learns one load overhead (Estimator.observe_load); give it the mean.
            self.est.load_overhead_s = sum(config.load_fixed_s.values()) / len(config.load_fixed_s)
        self.log: list[dict[str, Any]] = []
        self.now = 0.0
        self.cores = float(config.shared_cores)
        self.active: set[_Inst] = set()
        """Instances with requests running (what shares the host's cores when ``shared_cores`` > 0)."""
        self.pool = 1.0
        """Current slowdown of every instance from sharing the cores: max(1, active / shared_cores)."""
        self.servers: list[_Server] = []
        self.gpus: list[_Gpu] = []
        self.model_servers: dict[str, set[int]] = {m.name: set() for m in config.models}
        # The SchedulerActor's placement steps, on this virtual clock: every node is up.
        self.steps = steps.PlacementSteps(
            self, policy, migration=config.migration, estimator=self.est, rng=self.rng,
            make_instance=lambda iid, model, node, gpu, mem, now: _Inst(
                iid, self.specs[model], self.by_key[(node, gpu)], mem, now),
            request_order=lambda r: r.idx, skip_stuck_models=True,
        )
        for m in config.models:
            self.steps.add_model(m.name, steps.ModelLimits(m.max_concurrency, m.max_instances))
        for si, sc in enumerate(config.servers):
            srv = _Server(si, sc, self._dropped, self._log if config.record_log else None)
            self.servers.append(srv)
            self.steps.alive.add(sc.name)
            for gi, mem in enumerate(sc.gpu_memory):
                g = _Gpu(len(self.gpus), srv, gi, int(mem), self.steps.add_gpu(sc.name, gi, int(mem)))  # type: ignore[arg-type]
                srv.gpus.append(g)
                self.gpus.append(g)
        if not self.gpus:
            raise ValueError("the cluster has no GPU")
        self.views: list[GpuView] = [g.view for g in self.gpus]
        if config.cpu_devices:
            for view in self.views:
                view.kind = "cpu"
        if policy == "random":
            for _ in range(config.prior_choices):
                self.rng.choice(self.views)
        self.by_key = {g.view.key: g for g in self.gpus}
        self._place_checkpoints()
        self.now = 0.0
        self.heap: list[tuple[float, int, int, Any, Any]] = []
        self.seq = 0
        self.insts: dict[str, _Inst] = self.steps.instances  # type: ignore[assignment]
        self.loading_gpus: set[int] = set()
        self.loads = {t: 0 for t in TIERS}
        self.estimates: list[tuple[str, float, float]] = []
        self.decisions = {k: 0 for k in ("load", "migrate", "preempt", "wait")}
        self.migrations = 0
        self.preemptions = 0
        self.load_s = 0.0
        self.events = 0
        self._start_initial_instances()
        self.reqs: list[_Req] = []
        for idx, a in enumerate(workload):
            spec = self.specs.get(a.model)
            if spec is None:
                raise ValueError(f"workload request {idx} is for model {a.model!r}, not in the configuration")
            r = _Req(idx, a, spec)
            self.reqs.append(r)
            self._push(a.time_s, _ARRIVE, r, None)

    def _start_initial_instances(self) -> None:
        by_name = {s.name: s for s in self.servers}
        for model, server in self.cfg.initial_instances:
            spec = self.specs[model]
            gpu = next((g for g in by_name[server].gpus if g.free() >= self.need[model]), None)
            if gpu is None:
                raise ValueError(f"initial instance of {model}: no GPU of {server} has room for it")
            inst = self.steps.new_instance(spec.name, (gpu.view.node, gpu.view.gpu), [], 0.0)
            assert isinstance(inst, _Inst)
            inst.state = "ready"
            gpu.add(inst)
            self._maybe_idle(inst)

    # -------------------------------------------------------------- tiers

    def _place_checkpoints(self) -> None:
        by_name = {s.name: s for s in self.servers}
        n = len(self.servers)
        for k, m in enumerate(self.cfg.models):
            if self.cfg.initial_ssd is not None:
                names = self.cfg.initial_ssd.get(m.name, [])
            else:
                names = [self.servers[(k * self.cfg.replicas + j) % n].name for j in range(min(self.cfg.replicas, n))]
            for name in names:
                self._stored(by_name[name], "ssd", m.name)
            for name in (self.cfg.initial_dram or {}).get(m.name, []):
                self._stored(by_name[name], "dram", m.name)

    def _stored(self, srv: _Server, tier: str, model: str) -> None:
        if tier == "ssd" and self.load_mode == "rayserve-cache":
            srv.kept.put(model, self.specs[model].size_bytes)  # its own copies, seeded where ours are
        lru = srv.dram if tier == "dram" else srv.ssd
        lru.put(model, self.specs[model].size_bytes)
        if model in lru.items:
            self.model_servers[model].add(srv.index)

    def _dropped(self, srv: _Server, model: str) -> None:
        if model not in srv.holds["dram"] and model not in srv.holds["ssd"]:
            self.model_servers[model].discard(srv.index)

    # -------------------------------------------------------------- events

    def _log(self, kind: str, **data: Any) -> None:
        self.log.append({"time": self.now, "kind": kind, **data})

    def _push(self, t: float, kind: int, a: Any, b: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def run(self) -> None:
        heap = self.heap
        while heap:
            t, _, kind, a, b = heapq.heappop(heap)
            self.now = t
            self.events += 1
            if kind == _STEP:
                if a.epoch == b and a.state == "ready":
                    self._step(a)
            elif kind == _ARRIVE:
                a.status = "placing"
                self._run(self.steps.place(a, a.model, self.now))
            elif kind == _LOADED:
                self._loaded(a)
            elif kind == _SWITCH:
                self._switch(a, b)
            elif kind == _KEEPALIVE:
                self._keepalive(a, b)
            elif kind == _TIMEOUT:
                self._timeout(a, b)
            elif kind == _FETCHED:
                self._fetched(a)
            elif kind == _REPLACE:
                self._run(self.steps.place(a, a.model, self.now, exclude=b.instance_id))
            if self.cfg.check_invariants:
                self._check()
        for g in self.gpus:
            if g.active:
                g.busy_s += self.now - g.busy_since
                g.busy_since = self.now

    # -------------------------------------------------------------- placement: the SchedulerActor's steps

    def _run(self, todo: steps.Steps[Any]) -> Any:
        return steps.drive(todo, self._carry_out)

    def _carry_out(self, action: steps.Action) -> None:
        """Do in simulation what the placement steps decided."""
        if isinstance(action, steps.Serve):
            req = action.request
            req.queued_since = None
            self._assign(action.instance, req)  # type: ignore[arg-type]
        elif isinstance(action, steps.JoinLoad):
            req = action.request
            req.status, req.queued_since = "waiting-load", None
            if not req.cold_tier:
                req.cold_tier = action.instance.tier  # type: ignore[attr-defined]
        elif isinstance(action, steps.JoinReserved):
            req = action.request
            req.status, req.queued_since = "waiting-load", None
        elif isinstance(action, steps.Enqueued):
            self._enqueued(action.waiting.request)
        elif isinstance(action, steps.Decided):
            self._decided(action)
        elif isinstance(action, steps.StartInstance):
            self._load_on(action.instance)  # type: ignore[arg-type]
        elif isinstance(action, steps.Unload):
            self._unload(action.instance)  # type: ignore[arg-type]
        elif isinstance(action, steps.Migrate):
            self._start_migration(action)
        elif isinstance(action, steps.Preempt):
            self._preempt(action.instance)  # type: ignore[arg-type]
        else:
            raise TypeError(f"the simulation cannot do {action!r}")  # Fail: every model is configured

    def need_bytes(self, model: str) -> int:
        """(for the placement steps)"""
        return self.need[model]

    def gpu_views(self, model: str, now: float) -> list[GpuView]:
        """(for the placement steps) the views, brought up to ``now`` where ``choose`` for ``model`` reads them."""
        self._refresh_views(model)
        return self.views

    def _enqueued(self, req: _Req) -> None:
        req.status = "queued"
        if req.queued_since is None:
            req.queued_since = self.now
            req.queue_token += 1
            self._push(self.now + self.cfg.queue_timeout_s, _TIMEOUT, req, req.queue_token)

    def _decided(self, action: steps.Decided) -> None:
        decision = action.decision
        self.decisions[decision.kind] += 1
        if self.cfg.record_log:
            self._log("schedule", request=action.request.idx, model=action.model,
                      decision=decision.kind, node=decision.gpu[0] if decision.gpu else "",
                      gpu=decision.gpu[1] if decision.gpu else None, tier=decision.tier,
                      estimate_s=decision.estimate_s if decision.gpu else None, considered=decision.considered)

    def _refresh_views(self, model: str) -> None:
        now = self.now
        for gi in list(self.loading_gpus):
            g = self.gpus[gi]
            if self.cfg.load_pipeline == "node":
                # The SchedulerActor's queue term: the loads under way on the GPU's node, in their parts.
                loads = tuple(placement.LoadUnderWay(i.started, *i.parts)
                              for sg in g.server.gpus for i in sg.insts if i.state == "loading")
                for sg in g.server.gpus:
                    sg.view.loads, sg.view.now = loads, now
                if not any(i.state == "loading" for i in g.insts):
                    self.loading_gpus.discard(gi)
                continue
            left = g.load_free_at - now
            if left > _EPS:
                g.view.loading_s = left
            else:
                g.view.loading_s = 0.0
                self.loading_gpus.discard(gi)
        if self.policy in ("serverlessllm", "shepherd"):
            # Any busy instance may be asked to move, or waited for: refresh its requests' tokens so far and
            # left, and its step time as the scheduler measures it from token rates (the decode step slowed
            # by the requests sharing the instance and, with shared cores, by the other instances).
            for inst in (i for g in self.gpus for i in g.insts if i.requests):
                self._advance(inst)
                n = len(inst.requests)
                self.est.step_s[(inst.model, inst.node)] = (
                    inst.spec.decode_s_per_token * (1.0 + self.cfg.batch_sharing * (n - 1)) * self.pool)
                for r in inst.requests:
                    r.rv.tokens = r.tokens()
                    r.rv.remaining = r.output - (r.rv.tokens - r.prompt)

    def _preempt(self, busy: _Inst) -> None:
        """Shepherd: ``busy``'s requests stop at once and are placed again from scratch."""
        self._advance(busy)
        stopped = list(busy.requests)
        for r in stopped:
            self._stop(busy, r)
            r.restart()
            r.preemptions += 1
            self.preemptions += 1
            r.status = "preempted"
            self._push(self.now, _REPLACE, r, busy)
        self._reschedule(busy)

    def _start_migration(self, action: steps.Migrate) -> None:
        """ServerlessLLM: the requests keep decoding on the source while the destination loads (if it must)
        and recomputes their tokens; then they switch (:meth:`_switch`)."""
        src, dest = action.source, action.dest
        moving: list[_Req] = list(action.requests)
        dest.incoming += len(moving)
        dest.sync_view()  # type: ignore[attr-defined]
        order = _Order(src, dest, moving)  # type: ignore[arg-type]
        for r in moving:
            r.order = order
        if dest.state == "ready":
            self._send_order(order)
        else:
            dest.orders.append(order)  # type: ignore[attr-defined]

    def _send_order(self, order: _Order) -> None:
        src = order.source
        self._advance(src)
        for r in order.requests:
            if r.order is order and r.inst is src:
                self._push(self.now + self.est.migration_s(src.model, r.tokens()), _SWITCH, r, order)

    def _switch(self, req: _Req, order: _Order) -> None:
        if req.order is not order:
            return  # finished (or otherwise left) before the switch; its room was given back then
        req.order = None
        src, dest = order.source, order.dest
        dest.incoming -= 1
        dest.sync_view()
        if req.inst is not src:
            self._maybe_idle(dest)
            return
        self._advance(src)
        self._stop(src, req)
        self._reschedule(src)
        req.migrations += 1
        self.migrations += 1
        self._assign(dest, req)
        if src.draining and not src.requests:
            self._run(self.steps.try_reserved(self.now))
            self._maybe_idle(src)  # no reservation took its GPU: it goes at its keep-alive, as in the scheduler

    # -------------------------------------------------------------- instances

    def _load_cost(self, spec: ModelConfig, gpu: _Gpu, tier: str) -> float:
        return spec.size_bytes / gpu.view.bandwidth(tier) + self.cfg.load_fixed_s.get(tier, 0.0)

    def _load_on(self, inst: _Inst) -> None:
        """Load ``inst`` (counted on its GPU by the placement steps) from its node's fastest tier holding it."""
        spec, gpu, waiters = inst.spec, inst.device, inst.waiters
        tier = gpu.view.best_tier(spec.name)
        ready_at: float | None
        if self.load_mode != "serverlessllm":
            tier, dur, ready_at = self._baseline_load(spec, gpu)
        else:
            dur = self._load_cost(spec, gpu, tier)
            if self.cfg.cpu_devices:
                # A load and the decodes on its node share the host's cores, as the placement estimate says.
                decoding = sum(1 for g in gpu.server.gpus for i in g.insts if i.requests)
                dur *= 1.0 + placement.CPU_CONTENTION * decoding
        inst.tier = tier
        if self.load_mode != "serverlessllm":
            pass  # _baseline_load queued its download
        elif self.cfg.load_pipeline == "node":
            inst.parts = self.est.load_parts(spec.name, gpu.view)
            srv = gpu.server
            fetch, build, _ = placement.load_parts(tier, dur, self._load_cost(spec, gpu, "dram"))
            if tier == "repository":
                start = max(self.now, srv.fetch_free_at)
                srv.fetch_free_at = start + fetch
                self._push(srv.fetch_free_at, _FETCHED, inst, None)
                ready_at = None
            else:
                start = max(self.now, srv.build_free_at)
                srv.build_free_at = start + build
                ready_at = start + dur
        else:
            start = max(self.now, gpu.load_free_at)
            gpu.load_free_at = ready_at = start + dur
        self.loading_gpus.add(gpu.index)
        self.loads[tier] += 1
        self.load_s += dur
        for r in waiters:
            r.status = "waiting-load"
            if not r.cold_tier:
                r.cold_tier = tier
        gpu.add(inst)
        if ready_at is not None:
            self._push(ready_at, _LOADED, inst, None)

    def _baseline_load(self, spec: ModelConfig, gpu: _Gpu) -> tuple[str, float, float]:
        """A baseline's cold start: (tier it counts as, seconds, ready time). The download (none where
        ``rayserve-cache`` kept a copy on this node) waits for the node's other downloads, and ``from_pretrained``
        for the node's other builds (the baseline loader's build lock, as ours take turns); ``kserve``'s process
        start runs between the two, beside other loads."""
        srv, b = gpu.server, self.cfg.baseline
        cached = self.load_mode == "rayserve-cache" and spec.name in srv.kept.items
        build = spec.size_bytes / b.hf_bandwidth + b.hf_fixed_s
        if cached:
            srv.kept.touch(spec.name)
            downloaded = self.now
        else:
            start = max(self.now, srv.fetch_free_at)
            srv.fetch_free_at = downloaded = start + spec.size_bytes / (b.download_bandwidth or srv.bandwidth["repository"])
        began = max(downloaded + (b.process_start_s if self.load_mode == "kserve" else 0.0), srv.build_free_at)
        srv.build_free_at = ready = began + build
        return ("ssd" if cached else "repository"), ready - self.now, ready

    def _fetched(self, inst: _Inst) -> None:
        """(``load_pipeline`` ``node``) a repository fetch is done and stored on SSD; the build takes its turn."""
        srv = inst.device.server
        srv.ssd.put(inst.model, inst.spec.size_bytes)
        if inst.model in srv.holds["ssd"]:
            self.model_servers[inst.model].add(srv.index)
        _, build, _ = placement.load_parts("repository", self._load_cost(inst.spec, inst.device, "repository"),
                                           self._load_cost(inst.spec, inst.device, "dram"))
        start = max(self.now, srv.build_free_at)
        srv.build_free_at = start + build
        self._push(srv.build_free_at, _LOADED, inst, None)

    def _loaded(self, inst: _Inst) -> None:
        if inst.estimate_s > 0:
            self.estimates.append((inst.tier, inst.estimate_s, self.now - inst.started))
        if self.cfg.record_log:
            self._log("load", node=inst.device.server.name, gpu=inst.device.view.gpu, model=inst.model, tier=inst.tier,
                      seconds=self.now - inst.t_last, instance=inst.instance_id)
        inst.t_last = self.now
        srv = inst.device.server
        model = inst.model
        size = inst.spec.size_bytes
        if self.load_mode != "serverlessllm":
            if self.load_mode == "rayserve-cache":
                srv.kept.put(model, size)  # the other baselines delete their copy at unload
        elif inst.tier == "repository":
            if self.cfg.load_pipeline != "node":  # else stored when its fetch ended
                srv.ssd.put(model, size)
            srv.dram.put(model, size)
        elif inst.tier == "ssd":
            srv.ssd.touch(model)
            srv.dram.put(model, size)
        else:
            srv.dram.touch(model)
        if model in srv.holds["dram"] or model in srv.holds["ssd"]:
            self.model_servers[model].add(srv.index)
        self._run(self.steps.ready(inst, self.now))
        orders, inst.orders = inst.orders, []
        for order in orders:
            self._send_order(order)
        self._maybe_idle(inst)
        self._run(self.steps.drain_queue(self.now))

    def _unload(self, inst: _Inst) -> None:
        assert not inst.requests and not inst.waiters, f"unloading {inst.instance_id} with requests"
        if self.cfg.record_log:
            self._log("unload", node=inst.device.server.name, model=inst.model, instance=inst.instance_id)
        inst.state = "gone"
        self.steps.remove(inst)
        inst.device.remove(inst)

    def _maybe_idle(self, inst: _Inst) -> None:
        # Draining or not, as the scheduler's keep-alive: a reservation that takes the GPU unloads it first.
        if inst.idle():
            self._push(max(self.now, inst.last_used + inst.spec.keep_alive_s), _KEEPALIVE, inst, inst.last_used)

    def _keepalive(self, inst: _Inst, stamp: float) -> None:
        if inst.state != "ready" or inst.last_used != stamp or not inst.idle():
            return
        self._unload(inst)

    # -------------------------------------------------------------- requests on an instance

    def _advance(self, inst: _Inst) -> None:
        dt = self.now - inst.t_last
        inst.t_last = self.now
        if dt <= 0 or not inst.requests:
            return
        n = len(inst.requests)
        d = (dt / (1.0 + self.cfg.batch_sharing * (n - 1)) if n > 1 else dt) / self.pool
        for r in inst.requests:
            r.work_left -= d
            r.prefill_left -= d

    def _reschedule(self, inst: _Inst) -> None:
        inst.epoch += 1
        if not inst.requests:
            return
        n = len(inst.requests)
        slow = (1.0 + self.cfg.batch_sharing * (n - 1) if n > 1 else 1.0) * self.pool
        nxt = min((r.prefill_left if r.first_token is None else r.work_left) for r in inst.requests)
        self._push(self.now + max(0.0, nxt) * slow, _STEP, inst, inst.epoch)

    def _step(self, inst: _Inst) -> None:
        self._advance(inst)
        done = []
        for r in inst.requests:
            if r.first_token is None and r.prefill_left <= _EPS:
                r.first_token = self.now
            if r.work_left <= _EPS:
                done.append(r)
        for r in done:
            self._finish(inst, r)
        self._reschedule(inst)
        if done:
            self._after_finish(inst)

    def _set_active(self, inst: _Inst, active: bool) -> None:
        """``inst`` starts or stops decoding; with shared cores every other instance's speed changes."""
        if not self.cores:
            return
        if active:
            self.active.add(inst)
        else:
            self.active.discard(inst)
        pool = max(1.0, len(self.active) / self.cores)
        if pool == self.pool:
            return
        others = [i for i in self.active if i is not inst]
        for i in others:
            self._advance(i)  # at the old speed, up to now
        self.pool = pool
        for i in others:
            self._reschedule(i)

    def _assign(self, inst: _Inst, req: _Req) -> None:
        self._advance(inst)
        if not inst.requests:
            self._set_active(inst, True)
        req.inst = inst
        req.status = "running"
        inst.requests[req] = None
        inst.view.requests.append(req.rv)
        inst.last_used = self.now
        g = inst.device
        if g.active == 0:
            g.busy_since = self.now
        g.active += 1
        self._reschedule(inst)

    def _stop(self, inst: _Inst, req: _Req) -> None:
        """Take a running request off its instance (it finished, moved or was preempted)."""
        del inst.requests[req]
        inst.view.requests.remove(req.rv)
        req.inst = None
        if not inst.requests:
            self._set_active(inst, False)
        inst.last_used = self.now
        g = inst.device
        g.active -= 1
        if g.active == 0:
            g.busy_s += self.now - g.busy_since

    def _finish(self, inst: _Inst, req: _Req) -> None:
        self._stop(inst, req)
        req.server = inst.device.server.name
        req.status = "done"
        req.finish = self.now
        if req.order is not None:
            dest = req.order.dest
            req.order = None
            dest.incoming -= 1
            dest.sync_view()
            self._maybe_idle(dest)

    def _after_finish(self, inst: _Inst) -> None:
        self._maybe_idle(inst)
        self._run(self.steps.freed(inst, self.now))

    # -------------------------------------------------------------- the queue

    def _timeout(self, req: _Req, token: int) -> None:
        if req.status != "queued" or req.queue_token != token:
            return
        self.steps.unqueue(req)
        req.status = "failed"
        req.finish = self.now
        req.error = (f"no_capacity: no GPU could serve {req.model} within {self.cfg.queue_timeout_s:.0f}s "
                     "(all busy or too small)")

    # -------------------------------------------------------------- checks

    def _check(self) -> None:
        for g in self.gpus:
            used = sum(i.memory_bytes for i in g.insts)
            v = g.view
            assert used <= v.memory_total, f"{v.key} over memory: {used} > {v.memory_total}"
            assert used == v.used == GpuView.used.fget(v) and v.free == GpuView.free.fget(v), f"{v.key}: view"
            assert v.key == GpuView.key.fget(v)
            for m in self.specs:
                assert v.best_tier(m) == GpuView.best_tier(v, m), f"{v.key}: best tier of {m}"
            for t in TIERS:
                assert v.bandwidth(t) == GpuView.bandwidth(v, t)
            assert g.active == sum(len(i.requests) for i in g.insts), f"{g.view.key}: active count"
            for i in g.insts:
                assert [rv for rv in i.view.requests] == [r.rv for r in i.requests]
                assert i.incoming >= 0
                for r in i.requests:
                    assert r.inst is i and r.status == "running"
        for w in self.steps.queue:
            assert w.request.status == "queued"

    def result(self, wall_s: float) -> SimResult:
        records = []
        for r in self.reqs:
            ok = r.status == "done"
            if r.status not in ("done", "failed"):
                raise AssertionError(f"request {r.idx} ended the simulation {r.status}")
            records.append(RequestRecord(
                r.idx, r.model, r.arrival, r.prompt, r.output, r.status, r.finish,
                (r.first_token - r.arrival) if (ok and r.first_token is not None) else None,
                r.cold_tier, r.migrations, r.preemptions, r.server, r.error))
        return SimResult(self.name, self.seed, records, dict(self.loads), dict(self.decisions),
                         self.migrations, self.preemptions, sum(g.busy_s for g in self.gpus), self.load_s,
                         len(self.gpus), self.now, self.events, wall_s, self.estimates, self.log)


def simulate(config: SimConfig, workload: list[Arrival], policy: str, seed: int = 0) -> SimResult:
    """Run ``workload`` on ``config`` under ``policy``; deterministic for a given ``seed``."""
    t0 = time.perf_counter()
    sim = _Sim(config, workload, policy, seed)
    sim.run()
    return sim.result(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- CLI


def _size(text: str) -> int:
    from sllm_actors.runtime.topology import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bandwidth(text: str) -> float:
    return float(_size(text.removesuffix("/s")))


def _length(text: str) -> Any:
    if text.startswith("azure-"):
        return text
    if "-" in text:
        lo, hi = text.split("-", 1)
        return (int(lo), int(hi))
    return int(text)


def _mix(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name not in SIZE_CLASSES:
            raise argparse.ArgumentTypeError(f"unknown size class {name!r} (known: {', '.join(SIZE_CLASSES)})")
        out[name] = float(share or 1)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sllm simulate",
        description="Compare placement policies on a simulated cluster (discrete events, virtual clock), "
                    "running the scheduler's own placement code.",
    )
    c = p.add_argument_group("cluster")
    c.add_argument("--small", action="store_true",
                   help="the default topology.yaml instead: 2 nodes x 1 cpu device of 3 GiB, smollm2-135m")
    c.add_argument("--topology", type=Path, default=None,
                   help="nodes, GPUs, tiers and models of a topology.yaml instead (sizes: --calibration)")
    c.add_argument("--start-tier", choices=TIERS, default="ssd",
                   help="--small/--topology: where each node has every model at the start (default ssd)")
    c.add_argument("--servers", type=int, default=250)
    c.add_argument("--gpus-per-server", type=int, default=4)
    c.add_argument("--gpu-memory", type=_size, default=80 * GiB, help="e.g. 80GiB")
    c.add_argument("--dram", type=_size, default=512 * GB, help="DRAM tier per server, e.g. 512GB")
    c.add_argument("--ssd", type=_size, default=4000 * GB, help="SSD tier per server, e.g. 4TB")
    c.add_argument("--dram-bandwidth", type=_bandwidth, default=None, help="bytes/s, e.g. 20GB (default 20GB)")
    c.add_argument("--ssd-bandwidth", type=_bandwidth, default=None, help="bytes/s (default 2GB)")
    c.add_argument("--repository-bandwidth", type=_bandwidth, default=None, help="bytes/s (default 0.5GB)")
    c.add_argument("--models", type=int, default=1000)
    c.add_argument("--size-mix", type=_mix, default=None,
                   help=f"size classes and shares, e.g. 7b=0.5,13b=0.3,30b=0.2 (classes: {', '.join(SIZE_CLASSES)})")
    c.add_argument("--replicas", type=int, default=2, help="initial SSD copies of each checkpoint")
    c.add_argument("--keep-alive", type=float, default=None, help="seconds an idle instance stays (default 30; --small 300)")
    c.add_argument("--concurrency", type=int, default=None, help="requests per instance (default 8; --small 4)")
    c.add_argument("--max-instances", type=int, default=None, help="instances per model (default 32; --small 8)")
    c.add_argument("--queue-timeout", type=float, default=None, help="seconds (default 120)")
    c.add_argument("--batch-sharing", type=float, default=None,
                   help="0: requests on an instance batch for free (GPU); 1: one at a time (CPU); default 0, --small 1")
    c.add_argument("--calibration", type=Path, default=None, help="JSON file of measured costs (see load_calibration)")
    w = p.add_argument_group("workload")
    w.add_argument("--trace", choices=("gamma", "azure-conv", "azure-code"), default="gamma",
                   help="gamma: per-model Gamma arrivals; azure-*: the Azure 2023 trace's arrivals and lengths")
    w.add_argument("--trace-dir", type=Path, default=None, help="folder with conv.csv and code.csv")
    w.add_argument("--rps-scale", type=float, default=None,
                   help="azure-*: time-scale factor of the trace instead of --rps (2: twice the trace's rate)")
    w.add_argument("--workload", type=Path, default=None,
                   help="arrivals from a CSV (time_s,model,prompt_tokens,output_tokens; workload.save_workload)")
    w.add_argument("--rps", type=float, default=50.0, help="mean requests/s (an azure trace is time-scaled to it)")
    w.add_argument("--cv", type=float, default=2.0, help="inter-arrival CV per model (gamma)")
    w.add_argument("--zipf", type=float, default=1.0, help="popularity exponent s (1/rank^s)")
    w.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals")
    w.add_argument("--prompt-tokens", type=_length, default=512, help="N, LO-HI, or azure-conv/azure-code (gamma)")
    w.add_argument("--output-tokens", type=_length, default=128, help="N, LO-HI, or azure-conv/azure-code (gamma)")
    w.add_argument("--max-prompt", type=int, default=2048, help="clip trace prompt lengths")
    w.add_argument("--max-output", type=int, default=512, help="clip trace output lengths")
    r = p.add_argument_group("run")
    r.add_argument("--policy", default="all",
                   help=f"one of {', '.join(CHOICES)}, a comma list, or all (the placement policies; "
                        "the baselines by name)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--jobs", type=int, default=1, help="policies simulated in parallel processes")
    r.add_argument("--json", type=Path, default=None, help="write the summaries (and the setup) here")
    r.add_argument("--records", action="store_true", help="--json also gets every request's record")
    r.add_argument("--check", action="store_true", help="check invariants after every event (slow)")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    bw = {k: v for k, v in (("dram", args.dram_bandwidth), ("ssd", args.ssd_bandwidth),
                            ("repository", args.repository_bandwidth)) if v}
    if args.small or args.topology is not None:
        if args.topology is not None:
            cfg = SimConfig.from_topology(args.topology, start_tier=args.start_tier)
        else:
            cfg = SimConfig.small_cpu(start_tier=args.start_tier)
        for m in cfg.models:
            if args.keep_alive is not None:
                m.keep_alive_s = args.keep_alive
            if args.concurrency is not None:
                m.max_concurrency = args.concurrency
            if args.max_instances is not None:
                m.max_instances = args.max_instances
    else:
        cfg = SimConfig.cluster(
            args.servers, args.gpus_per_server, args.models, gpu_memory=args.gpu_memory, dram_bytes=args.dram,
            ssd_bytes=args.ssd, size_mix=args.size_mix,
            keep_alive_s=30.0 if args.keep_alive is None else args.keep_alive,
            max_concurrency=args.concurrency or 8, max_instances=args.max_instances or 32, replicas=args.replicas,
            seed=args.seed)
    if args.calibration is not None:
        cfg = apply_calibration(cfg, load_calibration(args.calibration))
    # Options given on the command line win over the calibration file.
    for s in cfg.servers:
        s.bandwidth.update(bw)
    if args.queue_timeout is not None:
        cfg.queue_timeout_s = args.queue_timeout
    if args.batch_sharing is not None:
        cfg.batch_sharing = args.batch_sharing
    cfg.check_invariants = args.check
    return cfg


def workload_from_args(args: argparse.Namespace, cfg: SimConfig) -> list[Arrival]:
    from sllm_eval import workload as wl

    names = cfg.model_names()
    if args.workload is not None:
        work = wl.load_workload(args.workload)
        unknown = sorted({a.model for a in work} - set(names))
        if unknown:
            raise ValueError(f"{args.workload}: models not in the configuration: {', '.join(unknown)}")
        return work
    if args.trace.startswith("azure-"):
        kind = args.trace.removeprefix("azure-")
        t, _, _ = wl.load_azure_trace(kind, args.trace_dir)
        scale = args.rps_scale if args.rps_scale is not None else args.rps / ((len(t) - 1) / t[-1])
        return wl.azure_workload(kind, names, args.duration, rps_scale=scale, seed=args.seed,
                                 max_prompt=args.max_prompt, max_output=args.max_output, path=args.trace_dir,
                                 zipf_s=args.zipf)

    def length(spec: Any, column: int, cap: int) -> Any:
        if isinstance(spec, str):
            values = wl.load_azure_trace(spec.removeprefix("azure-"), args.trace_dir)[column]
            return lambda rng: int(min(max(1, values[rng.integers(len(values))]), cap))
        return spec

    return wl.gamma_workload(names, args.rps, args.cv, args.duration, args.seed, zipf_s=args.zipf,
                             prompt_tokens=length(args.prompt_tokens, 1, args.max_prompt),
                             output_tokens=length(args.output_tokens, 2, args.max_output))


def _run_one(job: tuple[SimConfig, list[Arrival], str, int, bool]) -> dict[str, Any]:
    cfg, work, policy, seed, records = job
    res = simulate(cfg, work, policy, seed)
    out = res.summary()
    if records:
        out["records"] = [{**asdict(r), "latency_s": r.latency_s} for r in res.requests]
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(summaries: list[dict[str, Any]]) -> str:
    head = ["policy", "done", "failed", "lat mean", "lat p50", "lat p99", "ttft p50", "ttft p99",
            "cold dram", "cold ssd", "cold repo", "migr", "preempt", "gpu busy h", "util", "wall s"]
    rows = [head]
    for s in summaries:
        lat, ttft, cold = s["latency_s"], s["ttft_s"], s["cold_starts"]
        rows.append([s["policy"], str(s["completed"]), str(s["failed"]), _fmt(lat["mean"]), _fmt(lat["p50"]),
                     _fmt(lat["p99"]), _fmt(ttft["p50"]), _fmt(ttft["p99"]), str(cold["dram"]), str(cold["ssd"]),
                     str(cold["repository"]), str(s["migrations"]), str(s["preemptions"]),
                     _fmt(s["gpu_busy_s"] / 3600, 1), f"{s['gpu_utilization']:.1%}", _fmt(s["wall_s"], 1)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``sllm simulate`` (also ``python -m sllm_eval.simulator``): returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    policies = list(POLICIES) if args.policy == "all" else [p.strip() for p in args.policy.split(",")]
    bad = [p for p in policies if p not in CHOICES]
    if bad:
        parser.error(f"unknown policy {', '.join(bad)} (choose from {', '.join(CHOICES)} or all)")
    try:
        cfg = config_from_args(args)
        work = workload_from_args(args, cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    span = work[-1].time_s if work else 0.0
    print(f"{len(cfg.servers)} servers, {cfg.gpu_count} GPUs, {len(cfg.models)} models, {len(work)} requests "
          f"over {span:.0f}s ({args.workload or args.trace}), seed {args.seed}", file=sys.stderr)
    t0 = time.perf_counter()
    jobs = [(cfg, work, p, args.seed, args.records) for p in policies]
    if args.jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(jobs))) as pool:
            summaries = list(pool.map(_run_one, jobs))
    else:
        summaries = []
        for job in jobs:
            summaries.append(_run_one(job))
            print(f"  {job[2]}: {summaries[-1]['wall_s']:.1f}s", file=sys.stderr)
    print(format_table(summaries))
    print(f"total {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.json is not None:
        setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"setup": setup, "gpus": cfg.gpu_count, "requests": len(work),
                                         "results": summaries}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
