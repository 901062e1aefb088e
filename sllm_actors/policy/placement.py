"""Where a model should start: ServerlessLLM's locality-aware allocation, and the policies it is
compared with. Pure functions over a view of the cluster, so the SchedulerActor and the simulator
(``sllm simulate``) run the very same decisions, one on the wall clock and one on a virtual clock.

Start-up estimate of model m on GPU g:  queue(g) + size(m) / bandwidth(fastest tier of g's node
holding m), 0 when an idle instance of m is already loaded there; with no local copy the repository
tier's bandwidth applies. queue(g) is the wait for the loads g's node runs already, of which a node runs
one fetch and one build at a time (:func:`pipeline_wait_s`). Migration estimate of a running inference r
to GPU h: a_m * (tokens of r) + b_m, fitted from real resumes, plus h's start-up estimate for r's model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_BANDWIDTH",
    "DEFAULT_LINK_BYTES_PER_S",
    "Estimator",
    "GpuView",
    "InstanceView",
    "LinkCost",
    "LoadFit",
    "LoadUnderWay",
    "MigrationCost",
    "RunningView",
    "choose",
    "choose_transfer",
    "load_parts",
    "pipeline_wait_s",
    "placement_policy",
]

TIER_ORDER = ("dram", "ssd", "repository")
DEFAULT_BANDWIDTH = {"dram": 5e9, "ssd": 1e9, "repository": 1e8}
"""Used only until a node reports its measured bandwidths."""

Policy = Literal["serverlessllm", "shepherd", "locality-wait", "availability", "random"]


@dataclass
class RunningView:
    """A request running on an instance: what moving it would cost."""

    request_id: str
    tokens: int


@dataclass
class InstanceView:
    instance_id: str
    model: str
    state: str  # loading, ready, unloading, migrating
    requests: list[RunningView] = field(default_factory=list)
    memory_bytes: int = 0


@dataclass
class GpuView:
    node: str
    gpu: int
    memory_total: int
    instances: list[InstanceView] = field(default_factory=list)
    tiers: dict[str, float] = field(default_factory=dict)
    """tier -> measured bandwidth (bytes/s) on this GPU's node."""
    holds: dict[str, set[str]] = field(default_factory=dict)
    """tier -> models held by that tier on this GPU's node."""
    loading_s: float = 0.0
    """A flat queue term in seconds, used where ``loads`` is empty (a caller that knows only a total)."""
    loads: tuple[LoadUnderWay, ...] = ()
    """The loads under way on this GPU's node, for the queue term (see :func:`pipeline_wait_s`)."""
    now: float = 0.0
    """The clock ``loads`` were started on, read when the view was made."""

    def queue_wait_s(self, fetch_s: float = 0.0) -> float:
        """How long a load with a fetch of ``fetch_s`` (0: none) ordered now waits for the node's others."""
        if self.loads:
            return pipeline_wait_s(self.loads, self.now, fetch_s)
        return self.loading_s

    @property
    def key(self) -> tuple[str, int]:
        return self.node, self.gpu

    @property
    def used(self) -> int:
        return sum(i.memory_bytes for i in self.instances if i.state != "unloading")

    @property
    def free(self) -> int:
        return self.memory_total - self.used

    def best_tier(self, model: str) -> str:
        for tier in TIER_ORDER[:-1]:
            if model in self.holds.get(tier, set()):
                return tier
        return "repository"

    def bandwidth(self, tier: str) -> float:
        return self.tiers.get(tier) or DEFAULT_BANDWIDTH[tier]


@dataclass(frozen=True)
class LoadUnderWay:
    """A load in progress on a node, in the parts a node runs it in (``storage_client.py``): a repository
    fetch (a node's fetches take turns: one repository tier actor), then the build (a node-wide lock: builds
    take turns), then, for an SSD load under a bandwidth cap, the rest of its time outside the lock."""

    started: float
    fetch_s: float = 0.0
    build_s: float = 0.0
    tail_s: float = 0.0


def load_parts(tier: str, own_s: float, build_s: float) -> tuple[float, float, float]:
    """(fetch, build, tail) of a load from ``tier`` estimated at ``own_s`` in all, whose build alone (what a
    DRAM load of the same bytes costs) is ``build_s``; the same split the simulator's node pipeline makes."""
    build = min(own_s, max(0.0, build_s))
    if tier == "repository":
        return own_s - build, build, 0.0
    if tier == "ssd":
        return 0.0, build, own_s - build
    return 0.0, own_s, 0.0


def pipeline_wait_s(loads: Sequence[LoadUnderWay], now: float, fetch_s: float = 0.0) -> float:
    """The queue term of a start-up estimate: how long a load ordered at ``now`` (a fetch of ``fetch_s``, 0
    for none, then its build) waits for the loads under way on its node, replayed from their start times and
    estimated parts. Only what a node serializes delays it: its fetch waits for the fetches ahead, its build
    for the builds that asked for the lock before it did. A DRAM load does not wait for a fetch under way,
    nor for the build that follows the fetch if it is done by then. A load that outran its estimate delays
    nothing."""
    fetch_free = -math.inf
    ready: list[tuple[float, float]] = []
    for load in sorted(loads, key=lambda item: item.started):
        at = load.started
        if load.fetch_s > 0:
            at = fetch_free = max(at, fetch_free) + load.fetch_s
        ready.append((at, load.build_s))
    mine = max(now, fetch_free) + fetch_s if fetch_s > 0 else now
    build_free = -math.inf
    for at, seconds in sorted(ready):
        if at > mine:
            break  # it asks for the lock after this load does: it waits, not this one
        build_free = max(at, build_free) + seconds
    return max(0.0, max(mine, build_free) - (now + fetch_s))


@dataclass
class MigrationCost:
    """a * tokens + b seconds to resume a request of this model elsewhere, fitted online."""

    a: float = 0.0005
    b: float = 0.05
    samples: list[tuple[int, float]] = field(default_factory=list)

    def estimate(self, tokens: int) -> float:
        return self.a * tokens + self.b

    def observe(self, tokens: int, seconds: float) -> None:
        self.samples = (self.samples + [(tokens, seconds)])[-50:]
        if len(self.samples) < 2:
            self.b = max(0.0, seconds - self.a * tokens)
            return
        n = len(self.samples)
        mx = sum(t for t, _ in self.samples) / n
        my = sum(s for _, s in self.samples) / n
        var = sum((t - mx) ** 2 for t, _ in self.samples)
        if var > 0:
            a = sum((t - mx) * (s - my) for t, s in self.samples) / var
            if a > 0:
                self.a, self.b = a, max(0.0, my - a * mx)


DEFAULT_LINK_BYTES_PER_S = 1e9
DEFAULT_COPY_FIXED_S = 0.02
"""A KV copy's link figures until a real copy between the two nodes has been measured."""


@dataclass
class LinkCost:
    """Seconds to copy ``nbytes`` of KV cache between two nodes: ``fixed + nbytes / bandwidth``.

    Refined from real copies the way the storage tiers refine their bandwidth (a moving average): the
    bandwidth from the bytes over the time they took from the source's serializing to the destination's
    receiving them (through the controller), the fixed part from the destination's rebuild (checks, the
    cache on its device, the forward of the last token for its logits).
    """

    bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S
    fixed_s: float = DEFAULT_COPY_FIXED_S
    samples: list[tuple[int, float, float]] = field(default_factory=list)
    """(bytes, transfer seconds, fixed seconds) of the last copies."""

    def estimate(self, nbytes: int) -> float:
        return self.fixed_s + nbytes / self.bytes_per_s

    def observe(self, nbytes: int, transfer_s: float, fixed_s: float) -> None:
        if nbytes <= 0 or transfer_s <= 0:
            return
        bandwidth = nbytes / transfer_s
        if self.samples:
            self.bytes_per_s = 0.7 * self.bytes_per_s + 0.3 * bandwidth
            self.fixed_s = 0.7 * self.fixed_s + 0.3 * max(0.0, fixed_s)
        else:
            self.bytes_per_s, self.fixed_s = bandwidth, max(0.0, fixed_s)
        self.samples = (self.samples + [(nbytes, transfer_s, fixed_s)])[-50:]


@dataclass
class TransferChoice:
    kind: Literal["recompute", "copy"]
    copy_s: float
    recompute_s: float

    def describe(self) -> str:
        return f"copy est. {self.copy_s * 1000:.0f} ms vs recompute est. {self.recompute_s * 1000:.0f} ms"


def choose_transfer(mode: str, kv_bytes: int, tokens: int, recompute: MigrationCost, link: LinkCost) -> TransferChoice:
    """Send a request's KV cache or its tokens? ``mode`` forces one; ``auto`` takes the cheaper estimate.

    Recompute: the destination's prefill of ``tokens`` (``a * tokens + b``, fitted per model). Copy:
    ``kv_bytes`` over the measured link plus a fixed cost. Either way the rounds that follow carry only the
    tokens produced meanwhile, so a cheaper first round is also a shorter migration.
    """
    copy_s = link.estimate(kv_bytes) if kv_bytes > 0 else float("inf")
    recompute_s = recompute.estimate(tokens)
    if mode == "copy" and kv_bytes > 0:
        kind: Literal["recompute", "copy"] = "copy"
    elif mode == "auto":
        kind = "copy" if copy_s < recompute_s else "recompute"
    else:
        kind = "recompute"
    return TransferChoice(kind, copy_s, recompute_s)


@dataclass
class LoadFit:
    """Seconds to load a model from one tier of one node, ``fixed + bytes / bandwidth``, fitted by least
    squares over that tier's recent loads that ran alone on their node (a load beside another waits for it).

    The fixed part (building the model, its tokenizer, the instance) dominates small models and the
    bandwidth large ones; one shared overhead and a tier's raw measured bandwidth got both wrong (estimates
    +100 % for 50 MB loads from DRAM, -74 % for 1 GB ones on a CPU). Until loads of two different sizes have
    been seen, the fixed part is the mean residual over the tier's measured bandwidth.
    """

    samples: list[tuple[int, float]] = field(default_factory=list)
    fixed_s: float = 0.0
    bytes_per_s: float = 0.0
    """Fitted; 0 until the samples span two sizes and give a positive slope."""

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        self.samples = (self.samples + [(nbytes, seconds)])[-LOAD_FIT_SAMPLES:]
        n = len(self.samples)
        mx = sum(b for b, _ in self.samples) / n
        my = sum(t for _, t in self.samples) / n
        var = sum((b - mx) ** 2 for b, _ in self.samples)
        if n < 2 or var <= (0.1 * mx) ** 2 * n:
            return  # one size only: the slope is not determined
        slope = sum((b - mx) * (t - my) for b, t in self.samples) / var
        if slope <= 0:
            return
        self.bytes_per_s, self.fixed_s = 1.0 / slope, max(0.0, my - slope * mx)

    def predict(self, nbytes: int, measured_bytes_per_s: float) -> float:
        if self.bytes_per_s > 0:
            return self.fixed_s + nbytes / self.bytes_per_s
        fixed = sum(max(0.0, t - b / measured_bytes_per_s) for b, t in self.samples) / len(self.samples)
        return fixed + nbytes / measured_bytes_per_s


LOAD_FIT_SAMPLES = 20


@dataclass
class Estimator:
    model_bytes: dict[str, int] = field(default_factory=dict)
    migration: dict[str, MigrationCost] = field(default_factory=dict)
    links: dict[tuple[str, str], LinkCost] = field(default_factory=dict)
    """(source node, destination node) -> KV copy cost, from real copies."""
    load_overhead_s: float = 0.0
    """Time a load costs beyond moving bytes (building the model, starting its actor), learned from
    real loads: for small models it dominates, and leaving it out made estimates 100 % low. Used for a tier
    no load has been fitted for yet (see ``load_fits``)."""
    load_fits: dict[tuple[str, str], LoadFit] = field(default_factory=dict)
    """(node, tier) -> fixed + bytes / bandwidth, from that tier's real loads (a node with none borrows
    another node's fit of the same tier: the same kind of hardware, likely)."""

    def load_s(self, model: str, gpu: GpuView) -> float:
        """Start-up estimate of ``model`` on ``gpu``: the wait for what its node runs already, plus its own load
        from the fastest tier of the node that holds it."""
        fetch, build, tail = self.load_parts(model, gpu)
        return gpu.queue_wait_s(fetch) + fetch + build + tail

    def load_parts(self, model: str, gpu: GpuView) -> tuple[float, float, float]:
        """(fetch, build, tail) seconds of loading ``model`` on ``gpu`` by itself (no queue)."""
        tier = gpu.best_tier(model)
        own = self.tier_load_s(model, gpu, tier)
        return load_parts(tier, own, self.tier_load_s(model, gpu, "dram") if tier != "dram" else own)

    def tier_load_s(self, model: str, gpu: GpuView, tier: str) -> float:
        nbytes = self.model_bytes.get(model, 1 << 30)
        fit = self.load_fits.get((gpu.node, tier))
        if fit is None or not fit.samples:
            fit = next((f for (_, t), f in self.load_fits.items() if t == tier and f.samples), None)
        if fit is not None:
            return fit.predict(nbytes, gpu.bandwidth(tier))
        return self.load_overhead_s + nbytes / gpu.bandwidth(tier)

    def observe_tier_load(self, node: str, tier: str, nbytes: int, seconds: float) -> None:
        """A load that ran alone on its node took ``seconds`` (the node's own measure, no queue in it)."""
        self.load_fits.setdefault((node, tier), LoadFit()).observe(nbytes, seconds)

    def observe_load(self, seconds: float, nbytes: int, bandwidth: float) -> None:
        overhead = max(0.0, seconds - (nbytes / bandwidth if bandwidth > 0 else 0.0))
        self.load_overhead_s = overhead if self.load_overhead_s == 0.0 else 0.7 * self.load_overhead_s + 0.3 * overhead

    def migration_s(self, model: str, tokens: int) -> float:
        return self.migration.setdefault(model, MigrationCost()).estimate(tokens)

    def link(self, source: str, dest: str) -> LinkCost:
        """The copy cost between two nodes: measured if a copy ran there, else any measured link's
        figures (same fabric, likely), else the defaults."""
        known = self.links.get((source, dest))
        if known is not None:
            return known
        measured = [c for c in self.links.values() if c.samples]
        if measured:
            latest = measured[-1]
            return LinkCost(latest.bytes_per_s, latest.fixed_s)
        return LinkCost()


@dataclass
class Decision:
    """What to do for a model that has no instance with room."""

    kind: Literal["load", "migrate", "preempt", "wait"]
    gpu: tuple[str, int] | None = None
    estimate_s: float = float("inf")
    tier: str = ""
    evict: list[str] = field(default_factory=list)
    """Idle instances on ``gpu`` to unload first."""
    move: list[tuple[str, tuple[str, int]]] = field(default_factory=list)
    """(busy instance on ``gpu``, destination GPU) for each instance whose requests must leave."""
    considered: list[dict[str, object]] = field(default_factory=list)
    """Every option weighed, with its estimate: logged so estimator error can be checked."""


def placement_policy(policy: str, migration: bool) -> str:
    """The policy ``choose`` runs: with the topology's ``migration: false`` the scheduler never moves a
    running inference to make room, so ``serverlessllm`` reduces to locality alone (``locality-wait``)."""
    return "locality-wait" if policy == "serverlessllm" and not migration else policy


def choose(policy: Policy, model: str, need: int, gpus: list[GpuView], est: Estimator,
           rng: random.Random | None = None) -> Decision:
    """Pick where ``model`` (``need`` bytes on the device) starts, by ``policy``."""
    rng = rng or random.Random(0)
    options: list[Decision] = []
    for g in gpus:
        idle = [i for i in g.instances if i.state == "ready" and not i.requests]
        room = g.free + sum(i.memory_bytes for i in idle)
        if room < need:
            continue
        evict = []
        free = g.free
        for inst in idle:
            if free >= need:
                break
            evict.append(inst.instance_id)
            free += inst.memory_bytes
        tier = g.best_tier(model)
        options.append(Decision("load", g.key, est.load_s(model, g), tier, evict=evict))
    considered = [{"kind": o.kind, "gpu": o.gpu, "tier": o.tier, "estimate_s": round(o.estimate_s, 4)} for o in options]

    if policy == "random":
        pick = rng.choice(options) if options else Decision("wait")
        pick.considered = considered
        return pick
    if policy == "availability":
        pick = options[0] if options else Decision("wait")  # first free GPU, locality ignored
        pick.considered = considered
        return pick

    best = min(options, key=lambda o: o.estimate_s, default=Decision("wait"))
    if policy == "locality-wait" or policy not in ("serverlessllm", "shepherd"):
        best.considered = considered
        return best

    # Locality with migration (ServerlessLLM) or preemption (Shepherd): a busy GPU whose node holds
    # the model in a faster tier may win, if its inferences can move to a GPU with room for them.
    for g in gpus:
        tier = g.best_tier(model)
        busy = [i for i in g.instances if i.state == "ready" and i.requests]
        if not busy or tier == "repository":
            continue
        if g.free + sum(i.memory_bytes for i in g.instances if i.state == "ready" and not i.requests) \
                + sum(i.memory_bytes for i in busy) < need:
            continue
        moves: list[tuple[str, tuple[str, int]]] = []
        cost = 0.0
        reserved: dict[tuple[str, int], int] = {}
        ok = True
        for inst in sorted(busy, key=lambda i: sum(r.tokens for r in i.requests)):
            dest = _destination_for(inst, g, gpus, est, reserved)
            if dest is None:
                ok = False
                break
            dest_gpu, dest_s = dest
            reserved[dest_gpu.key] = reserved.get(dest_gpu.key, 0) + inst.memory_bytes
            moves.append((inst.instance_id, dest_gpu.key))
            if policy == "serverlessllm":
                # Token-based migration: the destination loads, then recomputes the KV cache while
                # the source keeps generating; the new model waits for the slowest move.
                move_s = dest_s + max(est.migration_s(inst.model, r.tokens) for r in inst.requests)
            else:
                # Shepherd preempts: the source stops at once, its requests restart from scratch.
                move_s = 0.0
            cost = max(cost, move_s)
        if not ok:
            continue
        estimate = cost + est.load_s(model, g)
        considered.append({"kind": "migrate" if policy == "serverlessllm" else "preempt", "gpu": g.key,
                           "tier": tier, "estimate_s": round(estimate, 4)})
        if estimate < best.estimate_s:
            best = Decision("migrate" if policy == "serverlessllm" else "preempt", g.key, estimate, tier,
                            evict=[i.instance_id for i in g.instances if i.state == "ready" and not i.requests],
                            move=moves)
    best.considered = considered
    return best


def _destination_for(inst: InstanceView, source: GpuView, gpus: list[GpuView], est: Estimator,
                     reserved: dict[tuple[str, int], int]) -> tuple[GpuView, float] | None:
    """The GPU where ``inst``'s model starts soonest, with room for it, other than ``source``."""
    best: tuple[GpuView, float] | None = None
    for g in gpus:
        if g.key == source.key:
            continue
        idle_same = any(i.model == inst.model and i.state == "ready" and not i.requests for i in g.instances)
        if not idle_same and g.free - reserved.get(g.key, 0) < inst.memory_bytes:
            continue
        startup = 0.0 if idle_same else est.load_s(inst.model, g)
        if best is None or startup < best[1]:
            best = (g, startup)
    return best
