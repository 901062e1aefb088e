"""SchedulerActor: which instance serves a request, and where a model starts.

The placement steps themselves (a ready instance of the model with room; else one that is loading; else a
GPU reserved for it; else a new instance where ``placement.choose`` says, unloading idle instances or
moving busy ones to make room; else the queue) are :class:`~sllm_actors.policy.steps.PlacementSteps`, the
same code the simulator runs. This actor is their shell: it feeds them the cluster's events and carries out
the actions they return (messages to nodes and the router, events), and it keeps what only a real cluster
has: live migrations' orders, the load estimator's measurements, the queue's timeout and idle instances'
``keep_alive`` on its ticks.

It also keeps the GPUs' health (:mod:`~sllm_actors.policy.health`): a load that fails counts against its GPU's
circuit breaker and its waiting requests are placed again (elsewhere, once the breaker opens), never failed
while healthy capacity exists; a poisoned device context makes the GPU unhealthy and restarts its node's
process; operators cordon, drain and uncordon nodes and reset breakers. GPUs that may not take work are left
out of ``choose``'s views and, through ``PlacementSteps.closed``/``no_loads``, out of the steps' own searches.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

from sllm_actors.actors.controller import node_process, router
from sllm_actors.actors.controller.context import ClusterContext
from sllm_actors.messages import (
    AbortMigration,
    Ack,
    AdoptInstances,
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
    NodeCommand,
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
from sllm_actors.policy import health, placement, steps
from sllm_actors.runtime import trace
from sllm_actors.runtime.supervisor import Directory, SupervisedActor
from sllm_actors.runtime.topology import DEFAULT_MODEL_SOURCE, ModelSpec

__all__ = [
    "SchedulerActor",
    "adopt_instances",
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
SAVE_ESTIMATES_S = 10.0
"""How often the estimates go to the cluster's store (what a restarted controller starts from)."""
LOAD_OVERHEAD = 1.15
"""Room for activations and KV caches beside the weights."""
CORDONS_KEY = "cordons"
"""The store's record of the operators' cordons and drains (node -> why, draining): kept through the store's
key-value records, which its SQLite and etcd forms both have, so a restarted controller keeps them."""


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


def report_request_tokens(directory: Directory, tokens: dict[str, int], remaining: dict[str, int] | None = None) -> bool:
    """Tokens so far (prompt + generated) of each running request, for the migration policy's estimates, and
    the tokens each may still generate (max_tokens - generated), for how long its instance stays busy."""
    return directory.tell(SCHEDULER, RequestTokens(tokens, dict(remaining or {})))


def adopt_instances(directory: Directory, node: str, instances: list[dict[str, Any]]) -> bool:
    """``node`` re-registered after a controller restart holding these instances (its status board's entries):
    they are counted as this scheduler's, with their requests, instead of unloaded as strangers."""
    return directory.tell(SCHEDULER, AdoptInstances(node, instances))


def node_up(directory: Directory, node: str, incarnation: str) -> bool:
    """``node`` (this ``incarnation`` of its process) joined: its GPUs take instances."""
    return directory.tell(SCHEDULER, NodeUp(node, incarnation))


def node_lost(directory: Directory, node: str, reason: str) -> bool:
    """``node`` is gone: its instances are lost."""
    return directory.tell(SCHEDULER, NodeLost(node, reason))


def tick(directory: Directory, now: float) -> bool:
    """The periodic wake-up: queue timeouts and idle instances' keep-alive."""
    return directory.tell(SCHEDULER, Tick(now))


class Instance(steps.Instance):
    """An instance as the placement steps see it, with what the scheduler measured of its load."""

    __slots__ = ("kv_blocks", "load_s", "overlapped", "parts", "prefix_cache", "started", "tier")

    def __init__(self, instance_id: str, model: str, node: str, gpu: int, memory_bytes: int, now: float) -> None:
        super().__init__(instance_id, model, node, gpu, memory_bytes, now)
        self.load_s = 0.0
        self.tier = ""
        self.parts: tuple[float, float, float] = (0.0, 0.0, 0.0)
        """Its own load's (fetch, build, tail) estimate, no queue: what it holds up other loads on its node by."""
        self.started = now
        self.overlapped = False
        """Another load ran on the same node meanwhile: its time holds a wait, not only its own work."""
        self.kv_blocks: tuple[int, int] = (0, 0)
        """(used, total) blocks of its KV pool, as its node last reported."""
        self.prefix_cache: tuple[int, int] = (0, 0)
        """(prompt tokens served from its prefix cache, tokens looked up), as its node last reported."""


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


class SchedulerActor(SupervisedActor):
    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, cluster: ClusterContext) -> None:
        super().__init__(supervisor, name)
        self.cluster = cluster
        self.topology = cluster.topology
        self.catalog: dict[str, ModelSpec] = {m.name: m for m in self.topology.models}
        self.model_bytes: dict[str, int] = {}
        self.migrations: dict[str, MigrationOrder] = {}
        self.policy = self.topology.scheduler.policy
        self.estimator = placement.Estimator(self.model_bytes)
        self.node_tiers: dict[str, dict[str, Any]] = {}
        """node -> {"bandwidth": {tier: B/s}, "holds": {tier: set(models)}} from NodeStatus."""
        self.request_tokens: dict[str, int] = {}
        """Tokens so far per running request (prompt + generated), for migration estimates."""
        self.request_remaining: dict[str, int] = {}
        """Tokens each running request may still generate, for how long its instance stays busy."""
        self.steps = steps.PlacementSteps(
            self, self.policy, migration=self.topology.scheduler.migration, estimator=self.estimator,
            rng=random.Random(0), make_instance=Instance,
        )
        for node in self.topology.nodes:
            for index, gpu in enumerate(node.gpus):
                self.steps.add_gpu(node.name, index, gpu.memory_bytes)
        for spec in self.catalog.values():
            self._add_model(spec)
        self.alive = self.steps.alive
        self.instances: dict[str, Instance] = self.steps.instances  # type: ignore[assignment]
        if cluster.epoch > 1:
            self.steps.id_prefix = f"e{cluster.epoch}."
        self._saved_at = time.monotonic()
        self.health = health.Health()
        self._restore()
        self.started_at = time.time()
        self.incarnations: dict[str, str] = {}
        """node -> the incarnation of its process last seen up (a new one has fresh device contexts)."""
        self.drain_tried: set[str] = set()
        """Instances on a draining node whose requests were offered to a migration (tried once each)."""
        self._reopened = False
        """A GPU's breaker turned half-open since the last tick: the queue is tried again."""

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        now = time.monotonic()
        self._apply_health(now)
        if isinstance(message, Place):
            trace.mark(message.request_id, "sched_in")
            self._place(message.request_id, message.model, now, exclude=message.exclude_instance)
        elif isinstance(message, RequestFinished):
            inst = self.instances.get(message.instance_id)
            self.request_tokens.pop(message.request_id, None)
            if inst is not None:
                self.steps.request_done(inst, message.request_id, now)
            self.steps.unqueue(message.request_id)
            self._run(self.steps.freed(inst, now))
        elif isinstance(message, InstanceReady):
            self._ready(message, now)
        elif isinstance(message, LoadFailed):
            self._load_failed(message, now)
        elif isinstance(message, InstanceGone):
            crashed = self.instances.get(message.instance_id)
            if crashed is not None:
                # Once per poisoning: a second instance crashing on the same device must not kill the node's
                # next process.
                was_unhealthy = crashed.key in self.health.unhealthy
                if self.health.instance_crashed(crashed.key, message.reason, now) and not was_unhealthy:
                    self._poisoned(crashed.key, message.reason)
            self._gone([message.instance_id], message.reason, now)
        elif isinstance(message, AdoptInstances):
            self._adopt(message, now)
        elif isinstance(message, NodeUp):
            if self.incarnations.get(message.node, message.incarnation) != message.incarnation:
                self.health.node_restarted(message.node)
                self._apply_health(now)
            self.incarnations[message.node] = message.incarnation
            self.alive.add(message.node)
            self._run(self.steps.drain_queue(now))
        elif isinstance(message, NodeLost):
            self.alive.discard(message.node)
            lost = [i.instance_id for i in self.instances.values() if i.node == message.node]
            self._gone(lost, f"node {message.node} lost: {message.reason}", now)
        elif isinstance(message, RequestTokens):
            self._request_tokens(message, now)
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
            self._migrate_command(message.peer, message.message, now)
        elif isinstance(message, FromClient) and isinstance(message.message, NodeCommand):
            self._node_command(message.peer, message.message, now)
        elif isinstance(message, Migrated):
            self._request_moved(message, now)
        elif isinstance(message, MigrationEnded):
            self._migration_ended(message, now)
        elif isinstance(message, Query):
            return self._query(message.what)
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    # ------------------------------------------------------------------ the placement steps' shell

    def _run(self, todo: steps.Steps[Any], cold_start: dict[str, Any] | None = None) -> Any:
        """Carry out what the placement steps decide, in order; ``cold_start``: what to tell the requests
        that waited for a load (:class:`~sllm_actors.policy.steps.Serve` ``after_load``)."""
        return steps.drive(todo, lambda action: self._carry_out(action, cold_start))

    def _carry_out(self, action: steps.Action, cold_start: dict[str, Any] | None) -> None:
        if isinstance(action, steps.Serve):
            inst = action.instance
            router.request_placed(self.cluster.directory, str(action.request), inst.node, inst.instance_id,
                                  cold_start if action.after_load else None)
            trace.mark(str(action.request), "sched_placed")
        elif isinstance(action, steps.Enqueued):
            log.info("scheduler: %s waits for capacity for %s", action.waiting.request, action.waiting.model)
        elif isinstance(action, steps.Fail):
            self._fail(str(action.request), action.code, action.message)
        elif isinstance(action, steps.Decided):
            decision = action.decision
            self.cluster.events.emit(
                "schedule", f"{self.policy}: {decision.kind} {action.model}"
                + (f" on {decision.gpu[0]}/gpu-{decision.gpu[1]} from {decision.tier}, est. "
                   f"{decision.estimate_s:.2f}s" if decision.gpu else ""),
                {"model": action.model, "request_id": action.request, "decision": decision.kind,
                 "estimate_s": decision.estimate_s if decision.gpu else None, "considered": decision.considered,
                 "reload_s": decision.reload_s, "drain": decision.drain},
            )
        elif isinstance(action, steps.StartInstance):
            self.health.load_started(action.instance.key, time.monotonic(), action.instance.model)
            self._apply_health(time.monotonic())  # a half-open breaker's trial: no second load there meanwhile
            self._load_on(action.instance, action.why)  # type: ignore[arg-type]
        elif isinstance(action, steps.Unload):
            self._unload(action.instance, action.why)
        elif isinstance(action, steps.Migrate):
            self._start_migration(action)
        elif isinstance(action, steps.Preempt):
            router.preempt_requests(self.cluster.directory, [str(r) for r in action.requests], action.why)
        # JoinLoad, JoinReserved: the request waits where the steps put it; nothing to send.

    def need_bytes(self, model: str) -> int:
        """(for the placement steps) device bytes an instance of ``model`` takes."""
        return self._need_bytes(self.catalog[model])

    def gpu_views(self, model: str, now: float) -> list[placement.GpuView]:
        """(for the placement steps) every GPU of an alive node, for ``choose``; none while ``model`` is the
        suspect of loads failing everywhere (policy/health.py): it starts nowhere until its trial is due."""
        if not self.health.model_may_load(model, now):
            return []
        return self._views(now)

    def _place(self, request_id: str, model: str, now: float, exclude: str = "") -> None:
        """Place a request: by the placement steps, unless no instance of ``model`` can take it and the model
        loads nowhere now (the suspect of loads failing everywhere): then it fails at once, saying why, rather
        than wait in the queue for loads that would fail."""
        held = self.health.model_held(model, now)
        if held and not any(i.model == model and i.state in ("ready", "loading") and i.instance_id != exclude
                            for i in self.instances.values()):
            self._fail(request_id, "load_failed", held)
            return
        self._run(self.steps.place(request_id, model, now, exclude=exclude))

    def _request_tokens(self, msg: RequestTokens, now: float) -> None:
        """The router's periodic report: tokens so far and left per request; their rates on each instance give
        its model's step time on its node (what the ``wait`` estimate multiplies the remaining tokens by)."""
        self.request_tokens = dict(msg.tokens)
        self.request_remaining = dict(msg.remaining)
        self.estimator.observe_tokens(msg.tokens, {
            str(r): (i.instance_id, i.model, i.node) for i in self.instances.values() for r in i.requests}, now)

    def _add_model(self, spec: ModelSpec) -> None:
        self.steps.add_model(spec.name, steps.ModelLimits(spec.target_concurrency, spec.max_instances))

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
                known.prefix_cache = (int(reported.get("prefix_hit_tokens", 0)),
                                      int(reported.get("prefix_query_tokens", 0)))
            if instance_id and instance_id not in self.instances and reported.get("state") != "loading":
                log.info("scheduler: %s holds %s, which nothing uses; unloading it", msg.node, instance_id)
                self.cluster.to_node(msg.node, UnloadModel(instance_id))

    def _adopt(self, msg: AdoptInstances, now: float) -> None:
        for entry in msg.instances:
            instance_id, model = str(entry.get("instance_id", "")), str(entry.get("model", ""))
            if not instance_id or instance_id in self.instances or entry.get("state") in ("loading", "failed"):
                continue
            if model not in self.catalog:
                log.warning("scheduler: %s holds %s of %s, a model this controller does not know; it will be "
                            "unloaded", msg.node, instance_id, model)
                continue
            memory = int(int(entry.get("memory_bytes", 0)) * LOAD_OVERHEAD) or self._need_bytes(self.catalog[model])
            self.steps.adopt_instance(instance_id, model, (msg.node, int(entry.get("gpu", 0))), memory,
                                      [str(r) for r in entry.get("requests", [])], now)
            log.info("scheduler: adopted %s (%s) on %s/gpu-%s with %d request(s)", instance_id, model, msg.node,
                     entry.get("gpu", 0), len(entry.get("requests", [])))

    # ------------------------------------------------------------------ what survives a controller restart

    def _persist(self, write: Any) -> None:
        """Write to the cluster's store, if it has one; a failed write is logged, the cluster goes on."""
        store = self.cluster.store
        if store is None:
            return
        from sllm_actors.actors.controller.store import StoreError

        try:
            write(store)
        except StoreError as exc:
            log.error("scheduler: %s", exc)

    def _restore(self) -> None:
        """Deployments and estimates a previous controller of this cluster stored."""
        store = self.cluster.store
        if store is None:
            return
        from sllm_actors.actors.controller.store import StoreError

        try:
            deployments, estimates = store.deployments(), store.estimates("scheduler") or {}
        except StoreError as exc:
            log.error("scheduler: %s; starting from the topology alone", exc)
            return
        for name, source in deployments:
            if name not in self.catalog:
                self.catalog[name] = ModelSpec(name=name, source=source)
                self._add_model(self.catalog[name])
        self.model_bytes.update({str(k): int(v) for k, v in estimates.get("model_bytes", {}).items()})
        est = self.estimator
        est.load_overhead_s = float(estimates.get("load_overhead_s", est.load_overhead_s))
        for key, value in estimates.get("step_s", []):
            est.step_s[tuple(key)] = float(value)  # type: ignore[assignment]
        for key, samples in estimates.get("load_fits", []):
            fit = placement.LoadFit()
            for nbytes, seconds in samples:
                fit.observe(int(nbytes), float(seconds))
            est.load_fits[tuple(key)] = fit  # type: ignore[index]
        if deployments or estimates:
            log.info("scheduler: restored %d deployment(s) and the estimates of %d model(s) from %s",
                     len(deployments), len(self.model_bytes), store.path)
        self._restore_cordons(store)

    def _restore_cordons(self, store: Any) -> None:
        """The operators' cordons and drains a previous controller of this cluster stored: a restart must not put
        a node an operator took out of service back to work (a drain goes on where it was)."""
        from sllm_actors.actors.controller.store import StoreError

        try:
            cordons = store.estimates(CORDONS_KEY) or {}
        except StoreError as exc:
            log.error("scheduler: %s; no cordon restored", exc)
            return
        names = {n.name for n in self.topology.nodes}
        for node, entry in sorted(cordons.items()):
            if node not in names:
                continue  # gone from the topology since
            self.health.cordon(node, str(entry.get("why", "cordoned by an operator")),
                               drain=bool(entry.get("draining")))
            text = f"{node} stays {'draining' if entry.get('draining') else 'cordoned'} across the restart"
            log.warning("scheduler: %s (%s)", text, entry.get("why", ""))
            self.cluster.events.emit("health", text, {"node": node, "action": "restored"})

    def _save_cordons(self) -> None:
        """Store the cordons as they are now (after each operator's command and each drain's end)."""
        cordons = {node: {"why": why, "draining": node in self.health.draining}
                   for node, why in self.health.cordoned.items()}
        self._persist(lambda store: store.save_estimates(CORDONS_KEY, cordons))

    def _save_estimates(self) -> None:
        est = self.estimator
        self._persist(lambda store: store.save_estimates("scheduler", {
            "model_bytes": dict(self.model_bytes), "load_overhead_s": est.load_overhead_s,
            "step_s": [[list(k), v] for k, v in est.step_s.items()],
            "load_fits": [[list(k), list(f.samples)] for k, f in est.load_fits.items()],
        }))

    def _in_migration(self) -> set[str]:
        return {o.source for o in self.migrations.values()} | {o.dest for o in self.migrations.values()}

    def _views(self, now: float) -> list[placement.GpuView]:
        views = []
        # Per node, not per GPU: a node's fetches and builds take turns across all of its GPUs.
        loads: dict[str, list[placement.LoadUnderWay]] = {}
        for i in self.instances.values():
            if i.state == "loading":
                loads.setdefault(i.node, []).append(placement.LoadUnderWay(i.started, *i.parts))
        in_migration = self._in_migration()
        for node in self.topology.nodes:
            if node.name not in self.alive:
                continue
            tiers = self.node_tiers.get(node.name, {})
            for index, gpu in enumerate(node.gpus):
                if (node.name, index) in self.steps.reserved or not self.health.may_load((node.name, index), now):
                    continue
                instances = [
                    placement.InstanceView(
                        # A destination waiting for its requests looks idle but must not be evicted.
                        i.instance_id, i.model,
                        "migrating" if i.draining or i.instance_id in in_migration else i.state,
                        [placement.RunningView(r, self.request_tokens.get(r, 0), self.request_remaining.get(r, -1))
                         for r in sorted(i.requests)],
                        i.memory_bytes,
                        self.catalog[i.model].target_concurrency if i.model in self.catalog else 0,
                    )
                    for i in self.steps.on_gpu[(node.name, index)]
                ]
                views.append(placement.GpuView(
                    node.name, index, gpu.memory_bytes, instances,
                    tiers=dict(tiers.get("bandwidth", {})), holds=tiers.get("holds", {}),
                    loads=tuple(loads.get(node.name, ())), now=now,
                    # CPU "GPUs" share the host's cores: a load there contends with the node's decodes.
                    kind="cpu" if gpu.device.split(":")[0] == "cpu" else "gpu",
                ))
        return views

    def _load_on(self, inst: Instance, why: str) -> None:
        """Order ``inst``'s node to load it (the steps counted it on its GPU already)."""
        spec = self.catalog[inst.model]
        node, gpu = inst.node, inst.gpu
        # Its own load's parts read only the node's tiers: no need for the whole cluster's views.
        tiers = self.node_tiers.get(node, {})
        inst.parts = self.estimator.load_parts(spec.name, placement.GpuView(
            node, gpu, 0, tiers=dict(tiers.get("bandwidth", {})), holds=tiers.get("holds", {})))
        for other in self.instances.values():
            if other is not inst and other.node == node and other.state == "loading":
                other.overlapped = inst.overlapped = True
        self.cluster.to_node(node, LoadModel(
            inst.instance_id, spec.name, spec.source, gpu, spec.target_concurrency, spec.dtype, spec.kv_cache_bytes,
            spec.deterministic, spec.max_batch, spec.prefix_caching,
        ))
        self.cluster.events.emit(
            "schedule", f"start {spec.name} on {node}/gpu-{gpu} {why}", {"model": spec.name, "node": node, "gpu": gpu},
        )

    def _unload(self, inst: steps.Instance, why: str) -> None:
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

    def _fail(self, request_id: str, code: str, message: str) -> None:
        router.placement_failed(self.cluster.directory, request_id, code, message)

    # ------------------------------------------------------------------ instance lifecycle

    def _ready(self, msg: InstanceReady, now: float) -> None:
        inst = self.instances.get(msg.instance_id)
        if inst is None:
            # Loaded after we gave up on it (node lost and back, say): nobody waits; unload it.
            self.cluster.to_node(msg.node, UnloadModel(msg.instance_id))
            return
        inst.load_s = msg.load_s
        inst.tier = msg.tier
        if self.health.breaker(inst.key).tripped:
            self.cluster.events.emit("health", f"{inst.node}/gpu-{inst.gpu}: a trial load succeeded; breaker closed",
                                     {"node": inst.node, "gpu": inst.gpu})
        suspect = self.health.models.get(inst.model)
        if suspect is not None and suspect.breaker.tripped:
            self.cluster.events.emit("health", f"model {inst.model}: a trial load succeeded on {inst.node}/"
                                               f"gpu-{inst.gpu}; it loads again", {"model": inst.model})
        self.health.load_succeeded(inst.key, inst.model)
        self._apply_health(now)
        if msg.memory_bytes and inst.model not in self.model_bytes:
            self.model_bytes[inst.model] = msg.memory_bytes
        measured = now - inst.started
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
        cold_start = {"tier": msg.tier, "node": msg.node, "load_s": msg.load_s, "order_to_ready_s": measured,
                      "parts": dict(msg.parts)}
        self._run(self.steps.ready(inst, now), cold_start)
        for order in list(self.migrations.values()):
            if order.dest == inst.instance_id and not order.sent:
                self._send_order(order, now)
        self._run(self.steps.drain_queue(now))

    def _load_failed(self, msg: LoadFailed, now: float) -> None:
        inst = self.instances.get(msg.instance_id)
        if inst is None:
            return
        self.steps.remove(inst)
        self.cluster.events.emit("error", f"loading {msg.model} on {msg.node}/gpu-{inst.gpu} failed: {msg.error}",
                                 {"model": msg.model, "node": msg.node, "gpu": inst.gpu})
        if msg.checkpoint_fault:
            # The checkpoint's own fault (corrupt, missing, refused): every GPU would fail it alike, so the GPU
            # keeps its health and the waiting requests get the load's error now, naming the file.
            self.health.load_abandoned(inst.key, inst.model)
            for request_id in inst.waiters:
                self._fail(str(request_id), "load_failed", f"loading {msg.model} on {msg.node} failed: {msg.error}")
        else:
            self._count_against_the_gpu(inst.key, msg.error, now, inst.model)
            # The requests that waited for it are placed again: on another GPU, or here again until the breaker
            # opens; failing them with the load's error while healthy capacity exists would lose them for nothing.
            # (A model that is the suspect of failing everywhere fails them at once instead: ``_place``.)
            for request_id in inst.waiters:
                self._place(str(request_id), inst.model, now)
        for order in [o for o in self.migrations.values() if o.dest == msg.instance_id]:
            self._end_order(order, "aborted", f"loading the destination failed: {msg.error}", now)
        self._run(self.steps.drain_queue(now))

    def _count_against_the_gpu(self, key: tuple[str, int], error: str, now: float, model: str) -> None:
        was_unhealthy = key in self.health.unhealthy
        verdict = self.health.load_failed(key, error, now, model)
        if verdict == "poisoned" and not was_unhealthy:
            self._poisoned(key, error)
        elif verdict == "suspect":
            self._model_suspect(model, now)
        elif verdict == "opened":
            breaker = self.health.breaker(key)
            self.cluster.events.emit(
                "health", f"{key[0]}/gpu-{key[1]}: breaker open for {breaker.open_for:.0f}s after "
                          f"{breaker.failures} failed loads in a row ({error})",
                {"node": key[0], "gpu": key[1], "state": "open", "reason": error})
        self._apply_health(now)

    def _model_suspect(self, model: str, now: float) -> None:
        """``model``'s loads fail on several GPUs: it is the suspect, not they. Its failures no longer hold the GPUs
        (their breakers closed where its failures were all they had), it loads nowhere until its trial, and the
        requests queued for it that no instance can take fail now, naming it."""
        held = self.health.model_held(model, now)
        cleared = self.health.acquitted
        log.error("scheduler: %s", held)
        self.cluster.events.emit(
            "health", held + (f"; breakers closed on {', '.join(f'{n}/gpu-{g}' for n, g in cleared)}" if cleared else ""),
            {"model": model, "state": "held", "reason": held})
        if any(i.model == model and i.state in ("ready", "loading") for i in self.instances.values()):
            return  # its queued requests wait for those instances
        for waiting in [w for w in self.steps.queue if w.model == model]:
            self.steps.unqueue(waiting.request)
            self._fail(str(waiting.request), "load_failed", held)

    def _gone(self, instance_ids: list[str], reason: str, now: float) -> None:
        lost_with_requests = []
        orphans: list[tuple[str, str]] = []
        for instance_id in instance_ids:
            inst = self.instances.get(instance_id)
            if inst is None:
                continue
            self.steps.remove(inst)
            if inst.state == "loading":
                self.health.load_abandoned(inst.key, inst.model)
            for order in list(self.migrations.values()):
                if order.dest == instance_id:
                    src = self.instances.get(order.source)
                    if src is not None and order.sent:
                        self.cluster.to_node(src.node, AbortMigration(order.migration_id, src.instance_id, reason))
                    else:
                        self._end_order(order, "aborted", f"destination lost: {reason}", now)
                elif order.source == instance_id:
                    # The router resumes those requests from their logs; the order itself is moot.
                    self._end_order(order, "aborted", f"source lost: {reason}", now)
            if inst.requests:
                lost_with_requests.append(instance_id)
            orphans += [(str(r), inst.model) for r in inst.waiters]
        if lost_with_requests:
            router.instances_lost(self.cluster.directory, lost_with_requests, reason)
        for request_id, model in orphans:
            self._place(request_id, model, now)
        self._run(self.steps.drain_queue(now))

    def _tick(self, now: float) -> None:
        if now - self._saved_at > SAVE_ESTIMATES_S:
            self._saved_at = now
            self._save_estimates()
        timeout = self.topology.scheduler.queue_timeout_s
        expired = self.steps.expire_queue(now, timeout)
        kept_out = [f"{node}/gpu-{gpu}: {why}" for node, gpu in self.steps.gpus
                    if expired and node in self.alive and (why := self.health.why_not((node, gpu), now))]
        for w in expired:
            self._fail(str(w.request), "no_capacity",
                       f"no GPU could serve {w.model} within {timeout:.0f}s (all busy or too small"
                       + (f"; kept out: {'; '.join(kept_out)}" if kept_out else "") + ")")
        if self.steps.queue and self._reopened:
            # A breaker turned half-open: a queued request may load there now.
            self._run(self.steps.drain_queue(now))
        self._reopened = False
        self._drain_nodes(now)
        in_migration = self._in_migration()
        for inst in list(self.instances.values()):
            spec = self.catalog.get(inst.model)
            if spec is None or not self.steps.is_idle(inst):
                continue
            if inst.instance_id in in_migration:
                continue  # a destination has no requests until the source hands them over
            if now - inst.last_used > spec.keep_alive_s:
                count = sum(1 for i in self.instances.values() if i.model == inst.model and i.state == "ready")
                if count > spec.min_instances:
                    self._unload(inst, f"idle for {spec.keep_alive_s:.0f}s, scale down")

    # ------------------------------------------------------------------ operators

    def _deploy(self, peer: bytes, msg: DeployModel) -> None:
        if msg.source.startswith(("http://", "https://")):
            # A URL stays a URL: the nodes fetch it (the controller checked it against the topology's
            # repositories); the controller's host need not reach the repository.
            url = msg.source if msg.source.endswith("/") else msg.source + "/"
            self._register(peer, msg, ModelSpec(name=msg.name, source=url), url)
            return
        source = Path(msg.source).expanduser()
        if not (is_model_dir(source) or (source.is_file() and source.suffix == ".gguf")):
            self.cluster.to_client(peer, ErrorReply(
                msg.request_id, "bad_source",
                f"{msg.source}: not a model directory (no config.json) nor a .gguf file on the controller's host",
            ))
            return
        self._register(peer, msg, ModelSpec(name=msg.name, source=str(source.resolve())), str(source))

    def _register(self, peer: bytes, msg: DeployModel, spec: ModelSpec, source: str) -> None:
        self.catalog[msg.name] = spec
        self._add_model(self.catalog[msg.name])
        self._persist(lambda store: store.save_deployment(spec.name, spec.source))
        self.model_bytes.pop(msg.name, None)
        self.cluster.events.emit("deploy", f"deployed {msg.name} from {source}", {"model": msg.name})
        self.cluster.to_client(peer, Ack(msg.request_id, f"deployed {msg.name}"))

    # ------------------------------------------------------------------ health: breakers, cordons, drains

    def _apply_health(self, now: float) -> None:
        """Tell the placement steps which GPUs take no new work (the health core's verdicts at ``now``)."""
        gpus = self.steps.gpus
        closed = {key for key in gpus if not self.health.may_serve(key)}
        no_loads = {key for key in gpus if key not in closed and not self.health.may_load(key, now)}
        if self.steps.no_loads - no_loads:
            self._reopened = True
        self.steps.closed, self.steps.no_loads = closed, no_loads

    def _poisoned(self, key: tuple[str, int], error: str) -> None:
        """``key``'s device context is broken: nothing runs there until a new process of its node has a fresh one.
        The whole node process restarts (its supervisor, NodeProcessActor, starts it again): a CUDA context
        cannot be rebuilt inside a process, and the requests of its other GPUs resume from their token logs
        elsewhere as after any node crash."""
        node, gpu = key
        log.error("scheduler: %s/gpu-%d is unhealthy, its device context poisoned: %s", node, gpu, error)
        self.cluster.events.emit("health", f"{node}/gpu-{gpu} unhealthy: device context poisoned ({error}); "
                                           f"restarting {node}", {"node": node, "gpu": gpu, "state": "unhealthy"})
        try:
            pid = node_process.kill(self.cluster.directory, node)
            log.warning("scheduler: killed %s (pid %d) to restart it with a fresh device context", node, pid)
        except KeyError:
            self.cluster.events.emit(
                "health", f"{node} is not a local node of this controller: restart its process "
                          f"(sllm node --join ...) to clear {node}/gpu-{gpu}", {"node": node, "gpu": gpu})
        except (pykka.ActorDeadError, pykka.Timeout) as exc:
            log.warning("scheduler: could not restart %s: %r", node, exc)

    def _gpu_of(self, target: str, node: str, gpu_part: str) -> tuple[int | None, str]:
        """The GPU index an operator's ``NODE/gpu-N`` names (None for a bare NODE), or why it names none."""
        if not gpu_part:
            return None, ""
        try:
            gpu = int(gpu_part.removeprefix("gpu-"))
        except ValueError:
            return None, f"target {target!r}: expected NODE or NODE/gpu-N"
        if not 0 <= gpu < len(self.topology.node(node).gpus):
            return None, f"{node} has no gpu-{gpu}"
        return gpu, ""

    def _node_command(self, peer: bytes, cmd: NodeCommand, now: float) -> None:
        def refuse(code: str, message: str) -> None:
            self.cluster.to_client(peer, ErrorReply(cmd.request_id, code, message))

        node, _, gpu_part = cmd.target.partition("/")
        names = [n.name for n in self.topology.nodes]
        if cmd.action == "breaker_reset" and node not in names and cmd.target in self.catalog:
            # A model held off everywhere (its loads failed on several GPUs) that an operator fixed.
            was = self.health.reset_model(cmd.target)
            detail = (f"reset model {cmd.target}: it loads again" if was
                      else f"model {cmd.target} has no failed loads on record")
            self.cluster.events.emit("health", detail, {"model": cmd.target, "action": cmd.action})
            self.cluster.to_client(peer, Ack(cmd.request_id, detail))
            self._run(self.steps.drain_queue(now))
            return
        if node not in names:
            refuse("unknown_node", f"no node {node!r} in the topology (nodes: {', '.join(names)})")
            return
        if gpu_part and cmd.action != "breaker_reset":
            refuse("bad_target", f"{cmd.action} takes a node, not a GPU: {cmd.target!r}")
            return
        gpu, problem = self._gpu_of(cmd.target, node, gpu_part)
        if problem:
            refuse("bad_target", problem)
            return
        on_node = [i for i in self.instances.values() if i.node == node]
        running = sum(len(i.requests) for i in on_node)
        if cmd.action == "cordon":
            self.health.cordon(node, "cordoned by an operator", drain=node in self.health.draining)
            detail = f"cordoned {node}: it takes no new requests or instances ({running} running requests go on)"
        elif cmd.action == "uncordon":
            was = self.health.uncordon(node)
            self.drain_tried -= {i.instance_id for i in on_node}
            detail = f"uncordoned {node}: it takes work again" if was else f"{node} was not cordoned"
        elif cmd.action == "drain":
            self.health.cordon(node, "drained by an operator", drain=True)
            detail = (f"draining {node}: {running} running requests move elsewhere or finish there, then its "
                      f"{len(on_node)} instances unload; it stays cordoned")
        elif cmd.action == "breaker_reset":
            cleared = self.health.reset(node, gpu)
            where = cmd.target if gpu is None else f"{node}/gpu-{gpu}"
            detail = (f"reset {', '.join(f'{n}/gpu-{g}' for n, g in cleared)}: they take loads again" if cleared
                      else f"no open breaker or unhealthy GPU on {where}")
        else:
            refuse("bad_action", f"unknown node command {cmd.action!r} (cordon, uncordon, drain, breaker_reset)")
            return
        log.info("scheduler: %s", detail)
        self.cluster.events.emit("health", detail, {"node": node, "action": cmd.action})
        if cmd.action != "breaker_reset":
            self._save_cordons()
        self._apply_health(now)
        self.cluster.to_client(peer, Ack(cmd.request_id, detail))
        self._drain_nodes(now)
        self._run(self.steps.drain_queue(now))

    def _drain_nodes(self, now: float) -> None:
        """Empty the draining nodes: offer each busy instance's requests to a migration once (else they finish
        where they are), unload what is idle, and say when a node holds nothing any more."""
        self.drain_tried &= set(self.instances)
        for node in sorted(self.health.draining):
            on_node = [i for i in self.instances.values() if i.node == node]
            if not on_node:
                self.health.drained(node)
                self._save_cordons()
                self.cluster.events.emit("health", f"{node} drained: nothing runs there; it stays cordoned "
                                                   f"(sllm uncordon {node})", {"node": node, "state": "drained"})
                continue
            in_migration = self._in_migration()
            for inst in on_node:
                if inst.state != "ready" or inst.instance_id in in_migration:
                    continue
                if self.steps.is_idle(inst):
                    self._unload(inst, f"{node} is draining")
                elif (inst.requests and inst.instance_id not in self.drain_tried and node in self.alive
                      and self.topology.scheduler.migration):
                    self.drain_tried.add(inst.instance_id)
                    self._migrate_off(inst, now)

    def _migrate_off(self, inst: Instance, now: float) -> None:
        """Move ``inst``'s requests to the first other node with room for them (or an instance loaded there)."""
        for other in self.topology.nodes:
            if other.name == inst.node or other.name not in self.alive or other.name in self.health.cordoned:
                continue
            moved = self._run(self.steps.migrate(sorted(inst.requests), inst, (other.name, None),
                                                 f"draining {inst.node}", now))
            if moved is not None:
                return
        log.info("scheduler: no room elsewhere for %s's requests; they finish on draining %s",
                 inst.instance_id, inst.node)

    # ------------------------------------------------------------------ live migration

    def _migrate_command(self, peer: bytes, cmd: MigrateCommand, now: float) -> None:
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
        gpu, problem = self._gpu_of(cmd.target, node, gpu_part)
        if problem:
            refuse("bad_target", problem)
            return
        if node == src.node and gpu in (None, src.gpu) and len(self.topology.node(node).gpus) == 1:
            refuse("already_there", f"request {cmd.subject} already runs on {src.node}/gpu-{src.gpu}")
            return
        migration_id = self._run(self.steps.migrate(subjects, src, (node, gpu), f"operator order {cmd.request_id}",
                                                    now))
        if migration_id is None:
            refuse("no_room", f"no room for {src.model} on {cmd.target}")
            return
        order = self.migrations.get(migration_id)
        if order is not None:
            order.peer, order.command_id = peer, cmd.request_id

    def _start_migration(self, action: steps.Migrate) -> None:
        """Order the migration the placement steps decided (now, or once its destination is ready)."""
        src, dest = action.source, action.dest
        request_ids = [str(r) for r in action.requests]
        order = MigrationOrder(action.migration_id, src.instance_id, dest.instance_id, request_ids,
                               reason=action.reason)
        self.migrations[action.migration_id] = order
        for request_id in request_ids:
            router.migration_started(self.cluster.directory, request_id, action.migration_id,
                                     f"{src.node}/{src.instance_id}", f"{dest.node}/{dest.instance_id}")
        self.cluster.events.emit(
            "migrate", f"migrate {', '.join(request_ids)} {src.node}/gpu-{src.gpu} -> {dest.node}/gpu-{dest.gpu} "
                       f"({action.reason})", {"migration_id": action.migration_id})
        if dest.state == "ready":
            self._send_order(order, time.monotonic())

    def _send_order(self, order: MigrationOrder, now: float) -> None:
        src, dest = self.instances.get(order.source), self.instances.get(order.dest)
        if src is None or dest is None:
            self._end_order(order, "aborted", "the source or destination is gone", now)
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

    def _request_moved(self, msg: Migrated, now: float) -> None:
        src, dest = self.instances.get(msg.source_instance), self.instances.get(msg.dest_instance)
        if src is not None and msg.transfer == "copy" and msg.kv_bytes and msg.copy_s > 0 and dest is not None:
            link = self.estimator.links.setdefault((src.node, dest.node), placement.LinkCost())
            link.observe(msg.kv_bytes, max(1e-6, msg.copy_s - msg.copy_rebuild_s), msg.copy_rebuild_s)
        elif src is not None and msg.rounds and msg.transfer == "recompute":
            self.estimator.migration.setdefault(src.model, placement.MigrationCost()).observe(
                msg.tokens_recomputed, msg.total_s)
        if src is not None:
            self.steps.request_done(src, msg.request_id, now)
        if dest is not None:
            dest.requests[msg.request_id] = None
            dest.last_used = now

    def _migration_ended(self, msg: MigrationEnded, now: float) -> None:
        order = self.migrations.get(msg.migration_id)
        if order is not None:
            self._end_order(order, msg.outcome, msg.detail, now)

    def _end_order(self, order: MigrationOrder, outcome: str, detail: str, now: float) -> None:
        self.migrations.pop(order.migration_id, None)
        took = now - order.started
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
            self._run(self.steps.release(src.key, now))
        self._run(self.steps.try_reserved(now))
        self._run(self.steps.drain_queue(now))

    def _query(self, what: str) -> Any:
        if what == "health":
            return self.health.report(list(self.steps.gpus), time.monotonic())
        if what == "instances":
            return [
                {
                    "instance_id": i.instance_id, "node": i.node, "gpu": i.gpu, "model": i.model, "state": i.state,
                    "requests": sorted(i.requests), "waiting": len(i.waiters), "memory_bytes": i.memory_bytes,
                    "load_s": round(i.load_s, 3), "tier": i.tier,
                    "kv_blocks_used": i.kv_blocks[0], "kv_blocks_total": i.kv_blocks[1],
                    "prefix_hit_tokens": i.prefix_cache[0], "prefix_query_tokens": i.prefix_cache[1],
                }
                for i in self.instances.values()
            ]
        if what == "models":
            # A model whose loads fail everywhere says so here (sllm status, the HTTP front end's model list).
            report = self.health.report([], time.monotonic())["models"]
            return [{"name": m.name, "source": m.source,
                     "health": report.get(m.name, {}).get("state", "healthy"),
                     "health_reason": report.get(m.name, {}).get("reason", "")} for m in self.catalog.values()]
        if what == "migrations":
            return [
                {"migration_id": o.migration_id, "source": o.source, "dest": o.dest, "requests": o.request_ids,
                 "state": "running" if o.sent else "loading destination",
                 "seconds": round(time.monotonic() - o.started, 2)}
                for o in self.migrations.values()
            ]
        if what == "queue":
            return [{"request_id": w.request, "model": w.model} for w in self.steps.queue]
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
