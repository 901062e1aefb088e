"""Where a model should start: ServerlessLLM's locality-aware allocation, and the policies it is
compared with. Pure functions over a view of the cluster, so the SchedulerActor and the simulator
(``sllm simulate``) run the very same decisions, one on the wall clock and one on a virtual clock.

Start-up estimate of model m on GPU g:  queue(g) + size(m) / bandwidth(fastest tier of g's node
holding m), 0 when an idle instance of m is already loaded there; with no local copy the repository
tier's bandwidth applies. queue(g) is the wait for the loads g's node runs already, of which a node runs
one fetch and one build at a time (:func:`pipeline_wait_s`). Migration estimate of a running inference r
to GPU h: a_m * (tokens of r) + b_m, fitted from real resumes, plus h's start-up estimate for r's model
(0 where a ready instance of r's model has a free slot: no load); a move to a new instance spends a load of
r's model there (its reload), counted when options are compared, and an instance whose requests end before
its move plus that reload would is waited for rather than moved. Wait estimate on a busy GPU: the time its
busy instances need to finish (each request's remaining tokens x the model's measured step time on that
node) until the model fits, plus its start-up estimate there; ServerlessLLM waits only where that beats
every load and migration. On ``cpu`` devices a load beside decodes on the same node is slowed by them
(:data:`CPU_CONTENTION`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CPU_CONTENTION",
    "DEFAULT_BANDWIDTH",
    "DEFAULT_LINK_BYTES_PER_S",
    "DEFAULT_REMAINING_TOKENS",
    "DEFAULT_STEP_S",
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


DEFAULT_STEP_S = 0.05
"""Seconds a decode step takes a request, per model and node, until the node's token rate has been measured:
a 135M model on a shared CPU core runs about 20-30 tokens/s, a 7-30B model on a GPU 20-60 (15-50 ms)."""
DEFAULT_REMAINING_TOKENS = 128
"""Tokens a running request is assumed to have left when its budget is not known (the API's default
``max_tokens``)."""
CPU_CONTENTION = 1.0
"""On a node whose devices are ``cpu`` ones, every instance decoding there and a load share the host's cores
(the "GPUs" are threads of one process on one CPU): with ``n`` decoding, a load gets about 1 / (1 + n) of
the cores, and it slows those decodes as much. The replay on a 2-core VM showed it (issue 19: two 1 GB SSD
loads ran 35 s behind their estimates while decodes on the "other GPU" stalled). A load's estimate on such
a node is multiplied by ``1 + CPU_CONTENTION * n``, so a load goes, other things equal, beside no decode."""


@dataclass
class RunningView:
    """A request running on an instance: what moving it would cost, and how long it will stay."""

    request_id: str
    tokens: int
    """Tokens so far (prompt + generated): what a migration recomputes."""
    remaining: int = -1
    """Tokens it may still generate (max_tokens - generated); -1: not known (see DEFAULT_REMAINING_TOKENS)."""


@dataclass
class InstanceView:
    instance_id: str
    model: str
    state: str  # loading, ready, unloading, migrating
    requests: list[RunningView] = field(default_factory=list)
    memory_bytes: int = 0
    slots: int = 0
    """Requests it may run at once (the model's concurrency); 0: not known, it takes no moved request."""

    @property
    def spare(self) -> int:
        """Free slots: requests that may move here without a load."""
        return max(0, self.slots - len(self.requests)) if self.state == "ready" else 0


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
    kind: str = "gpu"
    """``cpu``: a device that shares its host's cores with the node's other devices (see CPU_CONTENTION)."""

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
    step_s: dict[tuple[str, str], float] = field(default_factory=dict)
    """(model, node) -> seconds a decode step takes one of its requests there, measured from the token rates
    the requests reached (a node with none borrows another node's figure for the model, else the prior)."""
    token_samples: dict[str, tuple[str, int, float]] = field(default_factory=dict)
    """request -> (instance, tokens so far, when) at the last report (see :meth:`observe_tokens`)."""

    def step_time(self, model: str, node: str) -> float:
        """Seconds per generated token of a request of ``model`` on ``node``: measured, or the prior."""
        known = self.step_s.get((model, node))
        if known is None:
            known = next((v for (m, _), v in self.step_s.items() if m == model), DEFAULT_STEP_S)
        return known

    def observe_step(self, model: str, node: str, seconds_per_token: float) -> None:
        """A request of ``model`` on ``node`` generated at ``1 / seconds_per_token`` tokens/s lately."""
        if seconds_per_token <= 0 or not math.isfinite(seconds_per_token):
            return
        old = self.step_s.get((model, node))
        self.step_s[(model, node)] = seconds_per_token if old is None else 0.7 * old + 0.3 * seconds_per_token

    def observe_tokens(self, tokens: dict[str, int], running: dict[str, tuple[str, str, str]], now: float) -> None:
        """A periodic report of tokens so far per request (``tokens``), with where each runs (``running``:
        request -> (instance, model, node)). A request that stayed on one instance since the last report and
        generated tokens meanwhile gives its model's step time on that node: seconds over tokens, as this
        cluster runs them (batching and shared cores included)."""
        samples: dict[str, tuple[str, int, float]] = {}
        for request_id, (instance_id, model, node) in running.items():
            count = tokens.get(request_id)
            if count is None:
                continue
            samples[request_id] = (instance_id, count, now)
            before = self.token_samples.get(request_id)
            if before is not None and before[0] == instance_id and count > before[1] and now > before[2]:
                self.observe_step(model, node, (now - before[2]) / (count - before[1]))
        self.token_samples = samples

    def busy_s(self, inst: InstanceView, node: str) -> float:
        """How long ``inst`` stays busy: its longest request's remaining tokens times the step time."""
        step = self.step_time(inst.model, node)
        return max((step * (r.remaining if r.remaining >= 0 else DEFAULT_REMAINING_TOKENS) for r in inst.requests),
                   default=0.0)

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
    """(busy instance on ``gpu``, destination GPU) for each instance whose requests must leave, all to one
    place."""
    split: list[tuple[str, tuple[str, int], tuple[str, ...]]] = field(default_factory=list)
    """(busy instance on ``gpu``, destination GPU, request ids) for an instance whose requests leave in parts,
    each to a ready instance of its model with free slots (no single destination had room for them all)."""
    drain: list[str] = field(default_factory=list)
    """Busy instances on ``gpu`` that are not moved but waited for: they take no new request, and the model
    loads once they (and the moved ones) are gone. Moving them would be done no sooner than they finish, or
    would save less than the load of their model it spends (see ``reload_s``)."""
    reload_s: float = 0.0
    """Seconds of loading the option spends on other models than this one: the fresh loads its moved instances
    need at their destinations (the moved model must be loaded again for its requests to go on). Not part of
    when the model starts (``estimate_s``), but of what the option costs: options are compared on
    ``estimate_s + reload_s``, so a move is taken only where the time it saves pays for the load it spends."""
    considered: list[dict[str, object]] = field(default_factory=list)
    """Every option weighed, with its estimate: logged so estimator error can be checked."""


def placement_policy(policy: str, migration: bool) -> str:
    """The policy ``choose`` runs: with the topology's ``migration: false`` the scheduler never moves a
    running inference to make room, so ``serverlessllm`` reduces to locality alone (``locality-wait``)."""
    return "locality-wait" if policy == "serverlessllm" and not migration else policy


def choose(policy: Policy, model: str, need: int, gpus: list[GpuView], est: Estimator,
           rng: random.Random | None = None) -> Decision:
    """Pick where ``model`` (``need`` bytes on the device) starts, by ``policy``.

    Every policy weighs the loads possible now (on a GPU with room, after unloading idle instances there).
    ``serverlessllm`` also weighs freeing a GPU by migrating its busy instances' requests (each instance to one
    destination, or split over ready instances of its model with free slots) and waiting for a busy GPU to
    free itself, and takes the option with the lowest estimate; ``shepherd`` weighs preempting them.
    """
    rng = rng or random.Random(0)
    decoding = _decoding_per_node(gpus)
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
        options.append(Decision("load", g.key, _load_estimate(model, g, est, decoding), tier, evict=evict))
    considered = [{"kind": o.kind, "gpu": o.gpu, "tier": o.tier, "estimate_s": round(o.estimate_s, 4)} for o in options]

    if policy == "random":
        pick = rng.choice(options) if options else Decision("wait")
        pick.considered = considered
        return pick
    if policy == "availability":
        pick = options[0] if options else Decision("wait")  # first free GPU, locality ignored
        pick.considered = considered
        return pick

    best = min(options, key=_cost, default=Decision("wait"))
    if policy == "locality-wait" or policy not in ("serverlessllm", "shepherd"):
        best.considered = considered
        return best

    # Locality with migration (ServerlessLLM) or preemption (Shepherd): a busy GPU may win, if its inferences
    # can move (or restart) elsewhere; its node's tier decides its load, the estimates decide.
    kind: Literal["migrate", "preempt"] = "migrate" if policy == "serverlessllm" else "preempt"
    for g in gpus:
        busy = [i for i in g.instances if i.state == "ready" and i.requests]
        if not busy or (kind == "preempt" and g.best_tier(model) == "repository"):
            # Shepherd preempts only for locality: a preemption's cost (the work its requests lose) is not in
            # the estimate, so a GPU with nothing local to gain is never worth it.
            continue
        if g.free + sum(i.memory_bytes for i in g.instances if i.state == "ready") < need:
            continue
        # The freed GPU's load alone is a lower bound of this option: where it cannot beat the best already
        # found, planning the moves (every busy instance against every GPU) is skipped; on a cluster of
        # 1,000 GPUs that planning for every busy GPU was most of a decision's time.
        if _load_estimate(model, g, est, decoding, leaving=len(busy)) >= _cost(best):
            continue
        plan = _plan_moves(busy, g, gpus, est, decoding, preempt=kind == "preempt")
        if plan is None:
            continue
        leave_s, moves, split, drain, reload_s = plan
        tier = g.best_tier(model)
        # The freed GPU's load runs beside none of the decodes that left its node: those waited for, those moved
        # to another node (a move to another device of the same ``cpu`` node keeps its decode on the host).
        estimate = leave_s + _load_estimate(model, g, est, decoding, leaving=_leaving_node(g, busy, plan, kind))
        considered.append({"kind": kind, "gpu": g.key, "tier": tier, "estimate_s": round(estimate, 4),
                           "reload_s": round(reload_s, 4)})
        if estimate + reload_s < _cost(best):
            best = Decision(kind, g.key, estimate, tier,
                            evict=[i.instance_id for i in g.instances if i.state == "ready" and not i.requests],
                            move=moves, split=split, drain=drain, reload_s=reload_s)

    if policy == "serverlessllm":
        # Waiting is an option like the others, priced from the busy instances' remaining tokens: taken only
        # where it beats every load and migration (a GPU holding the model in DRAM that frees in a second),
        # never while a cheaper option is there.
        wait = _best_wait(model, need, gpus, est, decoding)
        if wait is not None:
            considered.append({"kind": "wait", "gpu": wait.gpu, "tier": wait.tier,
                               "estimate_s": round(wait.estimate_s, 4)})
            if wait.estimate_s < _cost(best):
                best = wait
    best.considered = considered
    return best


def _cost(option: Decision) -> float:
    """What options are compared on: when the model starts, plus the loads of other models the option spends."""
    return option.estimate_s + option.reload_s


def _decoding_per_node(gpus: list[GpuView]) -> dict[str, int]:
    """node -> instances with requests running on its devices (what a load on a ``cpu`` node contends with)."""
    out: dict[str, int] = {}
    for g in gpus:
        out[g.node] = out.get(g.node, 0) + sum(1 for i in g.instances if i.requests)
    return out


def _load_estimate(model: str, gpu: GpuView, est: Estimator, decoding: dict[str, int], leaving: int = 0) -> float:
    """The start-up estimate of ``model`` on ``gpu``, slowed on a ``cpu`` node by the decodes that share its
    host's cores (see CPU_CONTENTION); ``leaving``: decodes on that node that will have moved away."""
    seconds = est.load_s(model, gpu)
    if gpu.kind == "cpu":
        seconds *= 1.0 + CPU_CONTENTION * max(0, decoding.get(gpu.node, 0) - leaving)
    return seconds


def _best_wait(model: str, need: int, gpus: list[GpuView], est: Estimator,
               decoding: dict[str, int]) -> Decision | None:
    """The GPU where ``model`` can start soonest by waiting for busy instances there to finish (the soonest
    done first, until it fits), with that wait plus the load as its estimate; None: no GPU ever fits it."""
    best: Decision | None = None
    for g in gpus:
        free = g.free + sum(i.memory_bytes for i in g.instances if i.state == "ready" and not i.requests)
        busy = sorted(((est.busy_s(i, g.node), i) for i in g.instances if i.state == "ready" and i.requests),
                      key=lambda item: item[0])
        waited, leaving = 0.0, 0
        for seconds, inst in busy:
            if free >= need:
                break
            free += inst.memory_bytes
            waited, leaving = seconds, leaving + 1
        if free < need or not busy or leaving == 0:
            continue  # never fits, or fits now (a load option, not a wait)
        estimate = waited + _load_estimate(model, g, est, decoding, leaving=leaving)
        if best is None or estimate < best.estimate_s:
            best = Decision("wait", g.key, estimate, g.best_tier(model))
    return best


def _plan_moves(busy: list[InstanceView], source: GpuView, gpus: list[GpuView], est: Estimator,
                decoding: dict[str, int], preempt: bool = False
                ) -> tuple[float, list[tuple[str, tuple[str, int]]],
                           list[tuple[str, tuple[str, int], tuple[str, ...]]], list[str], float] | None:
    """How ``source``'s busy instances leave it: (the seconds until the last has
    left, the whole-instance moves, the split ones, the instances waited for, the seconds of loads the moves
    spend); None: some instance's requests have nowhere to go, or (migration) nothing is worth moving.

    An instance's requests go to one destination (a ready instance of its model with enough free slots, an
    idle one, or a GPU with room for a new instance, counting idle instances there that may be unloaded),
    whichever starts soonest; or, when none can take them all or when that is sooner, spread over ready
    instances of the model with free slots (no load at all). Destinations chosen for one instance are
    reserved against the next.

    With migration, an instance may also stay and be waited for (drained): its requests finish where they
    are. It does where its move plus the load of its model the move spends (a new instance at the
    destination) is no sooner than its requests' own end: a move done after the requests would have finished
    saves nothing, and one that saves less than that load spends more of the cluster than it gives back. So
    do the instances that end before the last one leaves anyway (their move would not free the GPU sooner).
    Every busy instance leaves (moving only as many as free the room needed let cheap moves reserve GPUs for
    long loads others could have used: 2 % worse at CV 2 in the paper-scale sweep). Preemption (Shepherd) keeps
    its reach as it was."""
    reserved_bytes: dict[tuple[str, int], int] = {}
    reserved_slots: dict[str, int] = {}
    planned: list[tuple[InstanceView, float, float, float, list[tuple[str, tuple[str, int], tuple[str, ...]]],
                        tuple[str, int] | None]] = []
    """(instance, seconds to move it, the load the move spends, seconds until it ends by itself, split parts,
    or the whole move's destination)."""
    for inst in sorted(busy, key=lambda i: sum(r.tokens for r in i.requests)):
        recompute = 0.0 if preempt else max(est.migration_s(inst.model, r.tokens) for r in inst.requests)
        finish = math.inf if preempt else est.busy_s(inst, source.node)
        whole = _destination_for(inst, source, gpus, est, decoding, reserved_bytes, reserved_slots, widen=not preempt)
        # Preempted requests restart wherever they are placed next: only migration needs a split.
        parts = None if preempt else _split_for(inst, source, gpus, reserved_slots)
        if whole is None and parts is None:
            # Nowhere to go. Waiting for it instead would turn the option into a wait that holds the GPU reserved
            # meanwhile (the paper-scale sweep: a 48 s reservation for a 60 GB model that others then could not
            # use): that is what the wait option, re-decided at every finish, is for.
            return None
        if parts is not None and (whole is None or whole[1] > 0.0):
            for dest_inst, _, ids in parts:
                reserved_slots[dest_inst] = reserved_slots.get(dest_inst, 0) + len(ids)
            planned.append((inst, recompute, 0.0, finish, parts, None))
            continue
        assert whole is not None
        dest_gpu, startup, dest_inst_id = whole
        if dest_inst_id:
            reserved_slots[dest_inst_id] = reserved_slots.get(dest_inst_id, 0) + len(inst.requests)
            reload = 0.0
        else:
            reserved_bytes[dest_gpu.key] = reserved_bytes.get(dest_gpu.key, 0) + inst.memory_bytes
            reload = 0.0 if preempt else _own_load_s(inst.model, dest_gpu, est, decoding)
        # Token-based migration: the destination loads, then recomputes the KV cache while the source keeps
        # generating; the new model waits for the slowest move. Shepherd's preemption stops it at once.
        planned.append((inst, 0.0 if preempt else startup + recompute, reload, finish, [], dest_gpu.key))

    stays = {p[0].instance_id for p in planned if not preempt and p[1] + p[2] >= p[3]}
    last = max((p[3] if p[0].instance_id in stays else p[1] for p in planned), default=0.0)
    if not preempt:
        # Those that end before the last one leaves anyway stay too: moving them would not free the GPU sooner.
        stays |= {p[0].instance_id for p in planned if p[3] <= last}
        if len(stays) == len(planned):
            return None  # nothing is worth moving: that is the wait option (see _best_wait)
    moves: list[tuple[str, tuple[str, int]]] = []
    split: list[tuple[str, tuple[str, int], tuple[str, ...]]] = []
    drain: list[str] = []
    reload_s = 0.0
    for inst, _, reload, _, parts, dest in planned:
        if inst.instance_id in stays:
            drain.append(inst.instance_id)
            continue
        reload_s += reload
        if dest is not None:
            moves.append((inst.instance_id, dest))
        else:
            split.extend((inst.instance_id, key, ids) for _, key, ids in parts)
    return last, moves, split, drain, reload_s


def _leaving_node(source: GpuView, busy: list[InstanceView], plan: tuple[float, list[tuple[str, tuple[str, int]]],
                  list[tuple[str, tuple[str, int], tuple[str, ...]]], list[str], float], kind: str) -> int:
    """How many of ``source``'s busy instances stop decoding on its node under ``plan``: the drained ones, and the
    moved ones whose destinations are all on other nodes. (Preemption: all, as it always counted.)"""
    if kind == "preempt":
        return len(busy)
    _, moves, split, drain, _ = plan
    stays_on_node = {i for i, dest in moves if dest[0] == source.node}
    stays_on_node |= {i for i, dest, _ in split if dest[0] == source.node}
    moved = {i for i, _ in moves} | {i for i, _, _ in split}
    return len(drain) + len(moved - stays_on_node)


def _own_load_s(model: str, gpu: GpuView, est: Estimator, decoding: dict[str, int]) -> float:
    """The seconds ``model``'s load on ``gpu`` takes by itself (its node's queue left out): the loading work a
    move to a new instance there spends, slowed on a ``cpu`` node as :func:`_load_estimate` says."""
    seconds = sum(est.load_parts(model, gpu))
    if gpu.kind == "cpu":
        seconds *= 1.0 + CPU_CONTENTION * decoding.get(gpu.node, 0)
    return seconds


def _destination_for(inst: InstanceView, source: GpuView, gpus: list[GpuView], est: Estimator,
                     decoding: dict[str, int], reserved: dict[tuple[str, int], int],
                     reserved_slots: dict[str, int], widen: bool = True) -> tuple[GpuView, float, str] | None:
    """The GPU where all of ``inst``'s requests can run soonest, other than ``source``: (GPU, start-up seconds,
    the instance of its model already there that takes them, or '' for a new one). ``widen`` False: only an
    idle instance of its model or free room count (Shepherd's feasibility check, as it was: preemption's lost
    work is not priced, so more places to preempt for would only mean more preemptions)."""
    best: tuple[GpuView, float, str] | None = None
    n = len(inst.requests)
    for g in gpus:
        if g.key == source.key:
            continue
        if not widen:
            idle_same = any(i.model == inst.model and i.state == "ready" and not i.requests for i in g.instances)
            if not idle_same and g.free - reserved.get(g.key, 0) < inst.memory_bytes:
                continue
            startup = 0.0 if idle_same else _load_estimate(inst.model, g, est, decoding)
            if best is None or startup < best[1]:
                best = (g, startup, "")
            continue
        same = next((i for i in g.instances if i.model == inst.model
                     and i.spare - reserved_slots.get(i.instance_id, 0) >= n), None)
        if same is not None:
            return g, 0.0, same.instance_id  # a ready instance with free slots: nothing can start sooner
        idle = sum(i.memory_bytes for i in g.instances if i.state == "ready" and not i.requests)
        if g.free + idle - reserved.get(g.key, 0) < inst.memory_bytes:
            continue
        startup = _load_estimate(inst.model, g, est, decoding)
        if best is None or startup < best[1]:
            best = (g, startup, "")
    return best


def _split_for(inst: InstanceView, source: GpuView, gpus: list[GpuView], reserved_slots: dict[str, int]
               ) -> list[tuple[str, tuple[str, int], tuple[str, ...]]] | None:
    """``inst``'s requests spread over ready instances of its model elsewhere with free slots, most slots
    first: [(instance, its GPU, request ids)], or None if their slots cannot take them all."""
    targets = sorted(((i.spare - reserved_slots.get(i.instance_id, 0), i.instance_id, g.key)
                      for g in gpus if g.key != source.key for i in g.instances if i.model == inst.model),
                     key=lambda t: -t[0])
    pending = [r.request_id for r in inst.requests]
    parts = []
    for spare, instance_id, key in targets:
        if not pending:
            break
        if spare <= 0:
            continue
        take, pending = pending[:spare], pending[spare:]
        parts.append((instance_id, key, tuple(take)))
    return parts if not pending else None
