"""SchedulerActor: which instance serves a request, and where a model starts.

Placement here: a ready instance of the model with room; else one that is loading; else a new
instance on the first GPU with memory for it (unloading idle instances of other models if that makes
room); else the request waits in a queue until capacity appears or its timeout ends it with a clear
error. Idle instances go after the model's ``keep_alive``.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

from sllm_actors.policy import placement
from sllm_actors.actors.controller import router
from sllm_actors.actors.controller.context import ClusterContext
from sllm_actors.messages import (
    AbortMigration,
    Ack,
    DeployModel,
    ErrorReply,
    FromClient,
    InstanceGone,
    InstanceReady,
    LoadFailed,
    LoadModel,
    Message,
    MigrateCommand,
    Migrated,
    MigrateOut,
    MigrationEnded,
    NodeLost,
    NodeStatus,
    NodeUp,
    Place,
    Query,
    RequestFinished,
    RequestTokens,
    Tick,
    UnloadModel,
)
from sllm_actors.models import default_model_dir, directory_bytes, is_model_dir
from sllm_actors.runtime.supervisor import Directory, SupervisedActor
from sllm_actors.runtime.topology import DEFAULT_MODEL_SOURCE, ModelSpec

__all__ = [
    "SchedulerActor",
    "deliver_from_client",
    "deliver_from_node",
    "node_lost",
    "node_up",
    "report_request_tokens",
    "request_finished",
    "request_placement",
    "tick",
]

log = logging.getLogger(__name__)

UNKNOWN_MODEL_BYTES = 1 << 30
LOAD_OVERHEAD = 1.15
"""Room for activations and KV caches beside the weights."""


# ------------------------------------------------------------------ client functions
# What the router, the registry and the controller's IO thread tell the scheduler; each returns False when the
# scheduler is not there (restarting), as ``Directory.tell`` does.

SCHEDULER = "scheduler"
"""The scheduler's name in the controller's directory."""


def deliver_from_client(directory: Directory, peer: bytes, message: Message, role: str) -> bool:
    """An operator's ``DeployModel`` or ``MigrateCommand``, answered to ``peer``."""
    return directory.tell(SCHEDULER, FromClient(peer, message, role))


def deliver_from_node(directory: Directory, message: Message) -> bool:
    """A node's report that moves the scheduler's books: an instance ready, failed to load or gone, a request
    migrated, a migration ended, or the node's status (tier contents and bandwidths feed the estimates)."""
    return directory.tell(SCHEDULER, message)


def request_placement(directory: Directory, request_id: str, model: str, *, resume: bool = False,
                      exclude_instance: str = "") -> bool:
    """Find (or start) an instance of ``model`` for the request; ``resume``: it continues from its token log,
    not on ``exclude_instance``. The answer comes back to the router as ``Placed`` or ``PlacementFailed``."""
    return directory.tell(SCHEDULER, Place(request_id, model, resume, exclude_instance))


def request_finished(directory: Directory, request_id: str, instance_id: str) -> bool:
    """The request no longer occupies ``instance_id``: its slot is free."""
    return directory.tell(SCHEDULER, RequestFinished(request_id, instance_id))


def report_request_tokens(directory: Directory, tokens: dict[str, int]) -> bool:
    """Tokens so far (prompt + generated) of each running request, for the migration policy's estimates."""
    return directory.tell(SCHEDULER, RequestTokens(tokens))


def node_up(directory: Directory, node: str, incarnation: str) -> bool:
    """``node`` (this ``incarnation`` of its process) joined: its GPUs take instances."""
    return directory.tell(SCHEDULER, NodeUp(node, incarnation))


def node_lost(directory: Directory, node: str, reason: str) -> bool:
    """``node`` is gone: its instances are lost."""
    return directory.tell(SCHEDULER, NodeLost(node, reason))


def tick(directory: Directory, now: float) -> bool:
    """The periodic wake-up: queue timeouts and idle instances' keep-alive."""
    return directory.tell(SCHEDULER, Tick(now))


@dataclass
class Instance:
    instance_id: str
    node: str
    gpu: int
    model: str
    memory_bytes: int
    state: str = "loading"  # loading, ready, unloading
    requests: set[str] = field(default_factory=set)
    waiters: list[str] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    load_s: float = 0.0
    tier: str = ""
    estimate_s: float = 0.0
    """What the estimator predicted for this load, to report its error when the load is done."""
    parts: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Its own load's (fetch, build, tail) estimate, no queue: what it holds up other loads on its node by."""
    started: float = field(default_factory=time.monotonic)
    draining: bool = False
    """Its requests are being moved off to make room: it takes no new ones."""
    overlapped: bool = False
    """Another load ran on the same node meanwhile: its time holds a wait, not only its own work."""
    kv_blocks: tuple[int, int] = (0, 0)
    """(used, total) blocks of its KV pool, as its node last reported."""


@dataclass
class MigrationOrder:
    migration_id: str
    source: str
    dest: str
    request_ids: list[str]
    peer: bytes = b""
    command_id: str = ""
    reason: str = ""
    sent: bool = False
    started: float = field(default_factory=time.monotonic)


@dataclass
class Waiting:
    request_id: str
    model: str
    since: float


class SchedulerActor(SupervisedActor):
    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, cluster: ClusterContext) -> None:
        super().__init__(supervisor, name)
        self.cluster = cluster
        self.topology = cluster.topology
        self.catalog: dict[str, ModelSpec] = {m.name: m for m in self.topology.models}
        self.model_bytes: dict[str, int] = {}
        self.alive: set[str] = set()
        self.instances: dict[str, Instance] = {}
        self.queue: list[Waiting] = []
        self.migrations: dict[str, MigrationOrder] = {}
        self.policy = self.topology.scheduler.policy
        self.placement_policy = placement.placement_policy(self.policy, self.topology.scheduler.migration)
        self.estimator = placement.Estimator(self.model_bytes)
        self.node_tiers: dict[str, dict[str, Any]] = {}
        """node -> {"bandwidth": {tier: B/s}, "holds": {tier: set(models)}} from NodeStatus."""
        self.reserved: dict[tuple[str, int], tuple[str, list[str], float]] = {}
        self.request_tokens: dict[str, int] = {}
        """Tokens so far per running request (prompt + generated), for migration estimates."""
        """GPU -> (model, waiters, estimate) to load there once migrations or preemptions free it."""
        self.rng = __import__("random").Random(0)
        self._ids = itertools.count(1)
        self.started_at = time.time()

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Place):
            self._place(message.request_id, message.model, exclude=message.exclude_instance)
        elif isinstance(message, RequestFinished):
            inst = self.instances.get(message.instance_id)
            self.request_tokens.pop(message.request_id, None)
            if inst is not None:
                inst.requests.discard(message.request_id)
                inst.last_used = time.monotonic()
                if inst.draining:
                    self._try_reserved()
            self.queue = [w for w in self.queue if w.request_id != message.request_id]
            self._drain_queue()
        elif isinstance(message, InstanceReady):
            self._ready(message)
        elif isinstance(message, LoadFailed):
            self._load_failed(message)
        elif isinstance(message, InstanceGone):
            self._gone([message.instance_id], message.reason)
        elif isinstance(message, NodeUp):
            self.alive.add(message.node)
            self._drain_queue()
        elif isinstance(message, NodeLost):
            self.alive.discard(message.node)
            lost = [i.instance_id for i in self.instances.values() if i.node == message.node]
            self._gone(lost, f"node {message.node} lost: {message.reason}")
        elif isinstance(message, RequestTokens):
            self.request_tokens = dict(message.tokens)
        elif isinstance(message, NodeStatus):
            self._reconcile(message)
            tiers = message.status.get("tiers", [])
            self.node_tiers[message.node] = {
                "bandwidth": {t["tier"]: float(t.get("bandwidth") or 0.0) for t in tiers},
                "holds": {t["tier"]: set(t.get("models", [])) for t in tiers},
            }
        elif isinstance(message, Tick):
            self._tick(message.now)
        elif isinstance(message, FromClient) and isinstance(message.message, DeployModel):
            self._deploy(message.peer, message.message)
        elif isinstance(message, FromClient) and isinstance(message.message, MigrateCommand):
            self._migrate_command(message.peer, message.message)
        elif isinstance(message, Migrated):
            self._request_moved(message)
        elif isinstance(message, MigrationEnded):
            self._migration_ended(message)
        elif isinstance(message, Query):
            return self._query(message.what)
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    # ------------------------------------------------------------------ placement

    def _place(self, request_id: str, model: str, exclude: str = "") -> None:
        spec = self.catalog.get(model)
        if spec is None:
            known = ", ".join(sorted(self.catalog)) or "none"
            self._fail(request_id, "unknown_model", f"model {model!r} is not deployed (deployed: {known})")
            return
        ready = [
            i for i in self.instances.values()
            if i.model == model and i.state == "ready" and i.node in self.alive and i.instance_id != exclude
            and not i.draining and len(i.requests) < spec.target_concurrency
        ]
        if ready:
            inst = min(ready, key=lambda i: len(i.requests))
            self._assign(inst, request_id)
            return
        loading = [
            i for i in self.instances.values()
            if i.model == model and i.state == "loading" and len(i.waiters) < spec.target_concurrency
        ]
        if loading:
            loading[0].waiters.append(request_id)
            return
        for slot, (reserved_model, waiters, _) in self.reserved.items():
            if reserved_model == model and len(waiters) < spec.target_concurrency:
                waiters.append(request_id)
                return
        if self._start_instance(spec, request_id):
            return
        self.queue.append(Waiting(request_id, model, time.monotonic()))
        log.info("scheduler: %s waits for capacity for %s", request_id, model)

    def _start_instance(self, spec: ModelSpec, first_waiter: str) -> bool:
        count = sum(1 for i in self.instances.values() if i.model == spec.name and i.state != "unloading")
        if count >= spec.max_instances:
            return False
        need = self._need_bytes(spec)
        views = self._views()
        decision = placement.choose(self.placement_policy, spec.name, need, views, self.estimator, self.rng)  # type: ignore[arg-type]
        self.cluster.events.emit(
            "schedule", f"{self.policy}: {decision.kind} {spec.name}"
            + (f" on {decision.gpu[0]}/gpu-{decision.gpu[1]} from {decision.tier}, est. {decision.estimate_s:.2f}s"
               if decision.gpu else ""),
            {"model": spec.name, "request_id": first_waiter, "decision": decision.kind,
             "estimate_s": decision.estimate_s if decision.gpu else None, "considered": decision.considered},
        )
        if decision.kind == "wait" or decision.gpu is None:
            return False
        slot = decision.gpu
        for instance_id in decision.evict:
            inst = self.instances.get(instance_id)
            if inst is not None:
                self._unload(inst, f"to make room for {spec.name}")
        if decision.kind == "load":
            inst = self._load_on(spec, slot, [first_waiter], f"for {first_waiter}")
            inst.estimate_s = decision.estimate_s
            return True
        # migrate (ServerlessLLM) or preempt (Shepherd): free the GPU, then load there.
        self.reserved[slot] = (spec.name, [first_waiter], decision.estimate_s)
        for instance_id, dest in decision.move:
            busy = self.instances.get(instance_id)
            if busy is None:
                continue
            busy.draining = True
            if decision.kind == "migrate":
                order = self._migrate(sorted(busy.requests), busy, dest, f"make room for {spec.name}")
                if order is None:
                    # The GPU will not be freed: give the reservation up, the waiter queues instead.
                    busy.draining = False
                    _, waiters, _ = self.reserved.pop(slot, (None, [], 0.0))
                    self.queue += [Waiting(r, spec.name, time.monotonic()) for r in waiters]
            else:
                requests = sorted(busy.requests)
                busy.requests.clear()
                router.preempt_requests(self.cluster.directory, requests, f"preempted for {spec.name}")
                self._unload(busy, f"preempted for {spec.name}")
        self._try_reserved()
        return True

    def _try_reserved(self) -> None:
        """Load each reserved model once its GPU has been freed by migrations or preemptions."""
        for slot, (model, waiters, estimate) in list(self.reserved.items()):
            spec = self.catalog.get(model)
            if spec is None:
                del self.reserved[slot]
                continue
            on_gpu = [i for i in self.instances.values() if (i.node, i.gpu) == slot]
            still_busy = [i for i in on_gpu if i.draining and i.requests]
            if still_busy:
                continue
            for inst in on_gpu:
                if inst.draining and inst.state == "ready":
                    self._unload(inst, f"its requests moved away for {model}")
            del self.reserved[slot]
            if slot[0] not in self.alive:
                for request_id in waiters:
                    self._place(request_id, model)
                continue
            inst = self._load_on(spec, slot, waiters, "on the GPU freed for it")
            inst.estimate_s = estimate

    def _bandwidth(self, node: str, tier: str) -> float:
        measured = self.node_tiers.get(node, {}).get("bandwidth", {}).get(tier, 0.0)
        return measured or placement.DEFAULT_BANDWIDTH.get(tier, 1e9)

    def _reconcile(self, msg: NodeStatus) -> None:
        """Unload instances a node holds that this scheduler gave up on (the node was declared dead
        and came back, or a load finished after its request went elsewhere)."""
        if msg.node not in self.alive:
            return
        for reported in msg.status.get("instances", []):
            instance_id = reported.get("instance_id", "")
            known = self.instances.get(instance_id)
            if known is not None:
                known.kv_blocks = (int(reported.get("kv_blocks_used", 0)), int(reported.get("kv_blocks_total", 0)))
            if instance_id and instance_id not in self.instances and reported.get("state") != "loading":
                log.info("scheduler: %s holds %s, which nothing uses; unloading it", msg.node, instance_id)
                self.cluster.to_node(msg.node, UnloadModel(instance_id))

    def _views(self) -> list[placement.GpuView]:
        views = []
        # Per node, not per GPU: a node's fetches and builds take turns across all of its GPUs.
        loads: dict[str, list[placement.LoadUnderWay]] = {}
        for i in self.instances.values():
            if i.state == "loading":
                loads.setdefault(i.node, []).append(placement.LoadUnderWay(i.started, *i.parts))
        now = time.monotonic()
        in_migration = {o.source for o in self.migrations.values()} | {o.dest for o in self.migrations.values()}
        for node in self.topology.nodes:
            if node.name not in self.alive:
                continue
            tiers = self.node_tiers.get(node.name, {})
            for index, gpu in enumerate(node.gpus):
                if (node.name, index) in self.reserved:
                    continue
                instances = [
                    placement.InstanceView(
                        # A destination waiting for its requests looks idle but must not be evicted.
                        i.instance_id, i.model,
                        "migrating" if i.draining or i.instance_id in in_migration else i.state,
                        [placement.RunningView(r, self.request_tokens.get(r, 0)) for r in sorted(i.requests)],
                        i.memory_bytes,
                    )
                    for i in self.instances.values() if i.node == node.name and i.gpu == index
                ]
                views.append(placement.GpuView(
                    node.name, index, gpu.memory_bytes, instances,
                    tiers=dict(tiers.get("bandwidth", {})), holds=tiers.get("holds", {}),
                    loads=tuple(loads.get(node.name, ())), now=now,
                ))
        return views

    def _load_on(self, spec: ModelSpec, slot: tuple[str, int], waiters: list[str], why: str) -> Instance:
        node, gpu = slot
        instance_id = f"{spec.name}-{next(self._ids)}"
        inst = Instance(instance_id, node, gpu, spec.name, self._need_bytes(spec), waiters=list(waiters))
        # Its own load's parts read only the node's tiers: no need for the whole cluster's views.
        tiers = self.node_tiers.get(node, {})
        inst.parts = self.estimator.load_parts(spec.name, placement.GpuView(
            node, gpu, 0, tiers=dict(tiers.get("bandwidth", {})), holds=tiers.get("holds", {})))
        for other in self.instances.values():
            if other.node == node and other.state == "loading":
                other.overlapped = inst.overlapped = True
        self.instances[instance_id] = inst
        self.cluster.to_node(node, LoadModel(
            instance_id, spec.name, spec.source, gpu, spec.target_concurrency, spec.dtype, spec.kv_cache_bytes,
            spec.deterministic, spec.max_batch,
        ))
        self.cluster.events.emit(
            "schedule", f"start {spec.name} on {node}/gpu-{gpu} {why}", {"model": spec.name, "node": node, "gpu": gpu},
        )
        return inst

    def _gpus(self) -> list[tuple[str, int, int]]:
        """(node, gpu index, free bytes) of every GPU on an alive node, in topology order."""
        out = []
        for node in self.topology.nodes:
            if node.name not in self.alive:
                continue
            for index, gpu in enumerate(node.gpus):
                used = sum(
                    i.memory_bytes for i in self.instances.values() if i.node == node.name and i.gpu == index
                )
                out.append((node.name, index, gpu.memory_bytes - used))
        return out

    def _find_gpu(self, need: int, only: tuple[str, int | None] | None = None) -> tuple[str, int] | None:
        for node, gpu, free in self._gpus():
            if only is not None and (node != only[0] or (only[1] is not None and gpu != only[1])):
                continue
            if free >= need:
                return node, gpu
        return None

    def _make_room(self, need: int, only: tuple[str, int | None] | None = None) -> tuple[str, int] | None:
        """Unload idle instances (least recently used first) on the GPU where that frees enough."""
        for node, gpu, free in self._gpus():
            if only is not None and (node != only[0] or (only[1] is not None and gpu != only[1])):
                continue
            idle = sorted(
                (i for i in self.instances.values()
                 if i.node == node and i.gpu == gpu and i.state == "ready" and not i.requests and not i.waiters),
                key=lambda i: i.last_used,
            )
            if free + sum(i.memory_bytes for i in idle) < need:
                continue
            for inst in idle:
                if free >= need:
                    break
                self._unload(inst, "to make room")
                free += inst.memory_bytes
            return node, gpu
        return None

    def _unload(self, inst: Instance, why: str) -> None:
        inst.state = "unloading"
        self.cluster.to_node(inst.node, UnloadModel(inst.instance_id))
        self.cluster.events.emit(
            "unload", f"unload {inst.model} from {inst.node}/gpu-{inst.gpu} ({why})",
            {"model": inst.model, "node": inst.node},
        )

    def _need_bytes(self, spec: ModelSpec) -> int:
        known = self.model_bytes.get(spec.name)
        if known is None:
            known = _estimate_source_bytes(spec.source)
            self.model_bytes[spec.name] = known
        return int(known * LOAD_OVERHEAD)

    def _assign(self, inst: Instance, request_id: str, cold_start: dict[str, Any] | None = None) -> None:
        inst.requests.add(request_id)
        inst.last_used = time.monotonic()
        router.request_placed(self.cluster.directory, request_id, inst.node, inst.instance_id, cold_start)

    def _fail(self, request_id: str, code: str, message: str) -> None:
        router.placement_failed(self.cluster.directory, request_id, code, message)

    # ------------------------------------------------------------------ instance lifecycle

    def _ready(self, msg: InstanceReady) -> None:
        inst = self.instances.get(msg.instance_id)
        if inst is None:
            # Loaded after we gave up on it (node lost and back, say): nobody waits; unload it.
            self.cluster.to_node(msg.node, UnloadModel(msg.instance_id))
            return
        inst.state = "ready"
        inst.last_used = time.monotonic()  # keep-alive counts from ready, not from the order to load
        inst.load_s = msg.load_s
        inst.tier = msg.tier
        if msg.memory_bytes and inst.model not in self.model_bytes:
            self.model_bytes[inst.model] = msg.memory_bytes
        measured = time.monotonic() - inst.started
        if not inst.overlapped and msg.load_s > 0:
            nbytes = msg.memory_bytes or self.model_bytes.get(inst.model, 0)
            self.estimator.observe_load(msg.load_s, nbytes, self._bandwidth(inst.node, msg.tier))
            self.estimator.observe_tier_load(inst.node, msg.tier, nbytes, msg.load_s)
        if inst.estimate_s > 0:
            error = (inst.estimate_s - measured) / measured if measured > 0 else 0.0
            self.cluster.events.emit(
                "estimate", f"load of {inst.model} from {msg.tier}: estimated {inst.estimate_s:.2f}s, took "
                            f"{measured:.2f}s ({error:+.0%})",
                {"model": inst.model, "tier": msg.tier, "estimate_s": inst.estimate_s, "measured_s": measured,
                 "error": error},
            )
        if msg.memory_bytes:
            inst.memory_bytes = int(msg.memory_bytes * LOAD_OVERHEAD)
            self.model_bytes[inst.model] = msg.memory_bytes
        waiters, inst.waiters = inst.waiters, []
        cold_start = {"tier": msg.tier, "node": msg.node, "load_s": msg.load_s, "order_to_ready_s": measured,
                      "parts": dict(msg.parts)}
        for request_id in waiters:
            self._assign(inst, request_id, cold_start)
        for order in self.migrations.values():
            if order.dest == inst.instance_id and not order.sent:
                self._send_order(order)
        self._drain_queue()

    def _load_failed(self, msg: LoadFailed) -> None:
        inst = self.instances.pop(msg.instance_id, None)
        if inst is None:
            return
        self.cluster.events.emit("error", f"loading {msg.model} on {msg.node} failed: {msg.error}",
                                 {"model": msg.model, "node": msg.node})
        for request_id in inst.waiters:
            self._fail(request_id, "load_failed", f"loading {msg.model} on {msg.node} failed: {msg.error}")
        for order in [o for o in self.migrations.values() if o.dest == msg.instance_id]:
            self._end_order(order, "aborted", f"loading the destination failed: {msg.error}")
        self._drain_queue()

    def _gone(self, instance_ids: list[str], reason: str) -> None:
        lost_with_requests = []
        orphans: list[tuple[str, str]] = []
        for instance_id in instance_ids:
            inst = self.instances.pop(instance_id, None)
            if inst is None:
                continue
            for order in list(self.migrations.values()):
                if order.dest == instance_id:
                    src = self.instances.get(order.source)
                    if src is not None and order.sent:
                        self.cluster.to_node(src.node, AbortMigration(order.migration_id, src.instance_id, reason))
                    else:
                        self._end_order(order, "aborted", f"destination lost: {reason}")
                elif order.source == instance_id:
                    # The router resumes those requests from their logs; the order itself is moot.
                    self._end_order(order, "aborted", f"source lost: {reason}")
            if inst.requests:
                lost_with_requests.append(instance_id)
            orphans += [(r, inst.model) for r in inst.waiters]
        if lost_with_requests:
            router.instances_lost(self.cluster.directory, lost_with_requests, reason)
        for request_id, model in orphans:
            self._place(request_id, model)
        self._drain_queue()

    def _drain_queue(self) -> None:
        self._try_reserved()
        waiting, self.queue = self.queue, []
        for w in waiting:
            before = len(self.queue)
            self._place(w.request_id, w.model)
            if len(self.queue) > before:
                self.queue[-1] = w  # still waiting: keep its original arrival time for the timeout

    def _tick(self, now: float) -> None:
        timeout = self.topology.scheduler.queue_timeout_s
        expired = [w for w in self.queue if now - w.since > timeout]
        for w in expired:
            self.queue.remove(w)
            self._fail(w.request_id, "no_capacity",
                       f"no GPU could serve {w.model} within {timeout:.0f}s (all busy or too small)")
        in_migration = {o.source for o in self.migrations.values()} | {o.dest for o in self.migrations.values()}
        for inst in list(self.instances.values()):
            spec = self.catalog.get(inst.model)
            if spec is None or inst.state != "ready" or inst.requests or inst.waiters:
                continue
            if inst.instance_id in in_migration:
                continue  # a destination has no requests until the source hands them over
            if now - inst.last_used > spec.keep_alive_s:
                count = sum(1 for i in self.instances.values() if i.model == inst.model and i.state == "ready")
                if count > spec.min_instances:
                    self._unload(inst, f"idle for {spec.keep_alive_s:.0f}s, scale down")

    # ------------------------------------------------------------------ operators

    def _deploy(self, peer: bytes, msg: DeployModel) -> None:
        source = Path(msg.source).expanduser()
        if not (is_model_dir(source) or (source.is_file() and source.suffix == ".gguf")):
            self.cluster.to_client(peer, ErrorReply(
                msg.request_id, "bad_source",
                f"{msg.source}: not a model directory (no config.json) nor a .gguf file on the controller's host",
            ))
            return
        self.catalog[msg.name] = ModelSpec(name=msg.name, source=str(source.resolve()))
        self.model_bytes.pop(msg.name, None)
        self.cluster.events.emit("deploy", f"deployed {msg.name} from {source}", {"model": msg.name})
        self.cluster.to_client(peer, Ack(msg.request_id, f"deployed {msg.name}"))

    # ------------------------------------------------------------------ live migration

    def _migrate_command(self, peer: bytes, cmd: MigrateCommand) -> None:
        def refuse(code: str, message: str) -> None:
            self.cluster.to_client(peer, ErrorReply(cmd.request_id, code, message))

        # The subject is a request, or an instance whose every request moves.
        src = self.instances.get(cmd.subject)
        subjects = sorted(src.requests) if src is not None else [cmd.subject]
        if src is None:
            src = next((i for i in self.instances.values() if cmd.subject in i.requests), None)
        if src is None or not subjects:
            refuse("not_running", f"{cmd.subject} is not a running request nor an instance serving one")
            return
        node, _, gpu_part = cmd.target.partition("/")
        if node not in {n.name for n in self.topology.nodes}:
            refuse("unknown_node", f"no node {node!r} in the topology")
            return
        if node not in self.alive:
            refuse("node_down", f"node {node} is not up")
            return
        gpu: int | None = None
        if gpu_part:
            try:
                gpu = int(gpu_part.removeprefix("gpu-"))
            except ValueError:
                refuse("bad_target", f"target {cmd.target!r}: expected NODE or NODE/gpu-N")
                return
            if not 0 <= gpu < len(self.topology.node(node).gpus):
                refuse("bad_target", f"{node} has no gpu-{gpu}")
                return
        if node == src.node and gpu in (None, src.gpu) and len(self.topology.node(node).gpus) == 1:
            refuse("already_there", f"request {cmd.subject} already runs on {src.node}/gpu-{src.gpu}")
            return
        order = self._migrate(subjects, src, (node, gpu), f"operator order {cmd.request_id}")
        if order is None:
            refuse("no_room", f"no room for {src.model} on {cmd.target}")
            return
        order.peer, order.command_id = peer, cmd.request_id

    def _migrate(self, request_ids: list[str], src: Instance, where: tuple[str, int | None],
                 reason: str) -> MigrationOrder | None:
        """Move requests of ``src`` to an instance of its model at ``where`` (loading one if needed)."""
        spec = self.catalog[src.model]
        dest = next(
            (i for i in self.instances.values()
             if i.model == src.model and i.node == where[0] and (where[1] is None or i.gpu == where[1])
             and i.instance_id != src.instance_id and i.state in ("ready", "loading")
             and len(i.requests) + len(i.waiters) + len(request_ids) <= spec.target_concurrency),
            None,
        )
        if dest is None:
            need = self._need_bytes(spec)
            slot = self._find_gpu(need, where) or self._make_room(need, where)
            if slot is None:
                return None
            dest = self._load_on(spec, slot, [], f"as the destination of a migration ({reason})")
        migration_id = f"mig-{next(self._ids)}"
        order = MigrationOrder(migration_id, src.instance_id, dest.instance_id, list(request_ids), reason=reason)
        self.migrations[migration_id] = order
        for request_id in request_ids:
            router.migration_started(self.cluster.directory, request_id, migration_id,
                                     f"{src.node}/{src.instance_id}", f"{dest.node}/{dest.instance_id}")
        self.cluster.events.emit(
            "migrate", f"migrate {', '.join(request_ids)} {src.node}/gpu-{src.gpu} -> {dest.node}/gpu-{dest.gpu} "
                       f"({reason})", {"migration_id": migration_id})
        if dest.state == "ready":
            self._send_order(order)
        return order

    def _send_order(self, order: MigrationOrder) -> None:
        src, dest = self.instances.get(order.source), self.instances.get(order.dest)
        if src is None or dest is None:
            self._end_order(order, "aborted", "the source or destination is gone")
            return
        order.sent = True
        sched = self.topology.scheduler
        # The source weighs copy against recompute per request (it alone knows its caches' bytes), with
        # this model's fitted recompute cost and this pair of nodes' measured link.
        recompute = self.estimator.migration.setdefault(src.model, placement.MigrationCost())
        link = self.estimator.link(src.node, dest.node)
        self.cluster.to_node(src.node, MigrateOut(
            order.migration_id, src.instance_id, dest.node, dest.instance_id, order.request_ids,
            sched.migration_delta_tokens, sched.migration_max_rounds, sched.migration_transfer,
            recompute.a, recompute.b, link.bytes_per_s, link.fixed_s,
        ))

    def _request_moved(self, msg: Migrated) -> None:
        src, dest = self.instances.get(msg.source_instance), self.instances.get(msg.dest_instance)
        if src is not None and msg.transfer == "copy" and msg.kv_bytes and msg.copy_s > 0 and dest is not None:
            link = self.estimator.links.setdefault((src.node, dest.node), placement.LinkCost())
            link.observe(msg.kv_bytes, max(1e-6, msg.copy_s - msg.copy_rebuild_s), msg.copy_rebuild_s)
        elif src is not None and msg.rounds and msg.transfer == "recompute":
            self.estimator.migration.setdefault(src.model, placement.MigrationCost()).observe(
                msg.tokens_recomputed, msg.total_s)
        if src is not None:
            src.requests.discard(msg.request_id)
            src.last_used = time.monotonic()
        if dest is not None:
            dest.requests.add(msg.request_id)
            dest.last_used = time.monotonic()

    def _migration_ended(self, msg: MigrationEnded) -> None:
        order = self.migrations.get(msg.migration_id)
        if order is not None:
            self._end_order(order, msg.outcome, msg.detail)

    def _end_order(self, order: MigrationOrder, outcome: str, detail: str) -> None:
        self.migrations.pop(order.migration_id, None)
        took = time.monotonic() - order.started
        if outcome != "done":
            # The router is told so the request's stream record says the migration did not happen.
            router.migration_ended(self.cluster.directory, order.migration_id, order.source, outcome, detail)
        self.cluster.events.emit("migrate", f"migration {order.migration_id} {outcome} in {took:.2f}s"
                                 + (f": {detail}" if detail else ""), {"migration_id": order.migration_id})
        if order.peer:
            if outcome == "done":
                dest = self.instances.get(order.dest)
                where = f"{dest.node}/gpu-{dest.gpu}" if dest else order.dest
                text = f"migrated {', '.join(order.request_ids)} to {where} in {took:.2f}s"
                self.cluster.to_client(order.peer, Ack(order.command_id, f"{text} ({detail})" if detail else text))
            else:
                self.cluster.to_client(order.peer, ErrorReply(order.command_id, "migration_aborted", detail))
        src = self.instances.get(order.source)
        if src is not None and outcome != "done" and src.draining:
            # The GPU was not freed; stop waiting for it and let the reserved model choose again.
            src.draining = False
            for slot in [k for k in self.reserved if k == (src.node, src.gpu)]:
                model, waiters, _ = self.reserved.pop(slot)
                self.queue += [Waiting(r, model, time.monotonic()) for r in waiters]
        self._try_reserved()
        self._drain_queue()

    def _query(self, what: str) -> Any:
        if what == "instances":
            return [
                {
                    "instance_id": i.instance_id, "node": i.node, "gpu": i.gpu, "model": i.model, "state": i.state,
                    "requests": sorted(i.requests), "waiting": len(i.waiters), "memory_bytes": i.memory_bytes,
                    "load_s": round(i.load_s, 3), "tier": i.tier,
                    "kv_blocks_used": i.kv_blocks[0], "kv_blocks_total": i.kv_blocks[1],
                }
                for i in self.instances.values()
            ]
        if what == "models":
            return [{"name": m.name, "source": m.source} for m in self.catalog.values()]
        if what == "migrations":
            return [
                {"migration_id": o.migration_id, "source": o.source, "dest": o.dest, "requests": o.request_ids,
                 "state": "running" if o.sent else "loading destination",
                 "seconds": round(time.monotonic() - o.started, 2)}
                for o in self.migrations.values()
            ]
        if what == "queue":
            return [{"request_id": w.request_id, "model": w.model} for w in self.queue]
        raise ValueError(f"unknown query {what!r}")


def _estimate_source_bytes(source: str) -> int:
    if source == DEFAULT_MODEL_SOURCE:
        path = default_model_dir()
        return directory_weight_bytes(path) if path.exists() else 600 * 1024**2
    path = Path(source)
    if path.exists():
        return directory_weight_bytes(path)
    return UNKNOWN_MODEL_BYTES


def directory_weight_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    weights = [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".gguf") and p.is_file()]
    return sum(p.stat().st_size for p in weights) or directory_bytes(path)
