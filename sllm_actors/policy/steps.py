"""The placement steps, once, for the SchedulerActor and the simulator (``sllm simulate``).

A request for a model goes to a ready instance of it with room (the one with fewest requests); else it
waits on an instance of it that is loading; else on a GPU reserved for it; else a new instance starts where
:func:`~sllm_actors.policy.placement.choose` says: a cold start (after unloading the idle instances it
names), or, once the busy instances it names have moved away (migration), finished there (those it waits
for rather than moves) or been stopped (preemption), on the GPU they free; else the request queues until
capacity appears.

A pure core under two IO shells: :class:`PlacementSteps` holds what the steps decide on (instances per GPU
and their states, reservations, the queue) and reads no clock (``now`` is passed in). Each step is a
generator of plain records (:data:`Action`) saying what to do: the SchedulerActor carries them out with
messages to nodes and events on the wall clock, the simulator with simulated loads on a virtual clock.
Every action is carried out before the next one is asked for (:func:`drive`): the steps after it read
what it changed (a GPU's view after a load started, say). What the steps read of the cluster and do not
hold themselves (the bytes a model needs, the GPUs' views with their tiers and loads) they ask the shell
for through :class:`ClusterView`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

from sllm_actors.policy import placement

__all__ = [
    "Action",
    "ClusterView",
    "Decided",
    "Enqueued",
    "Fail",
    "Instance",
    "JoinLoad",
    "JoinReserved",
    "Migrate",
    "ModelLimits",
    "PlacementSteps",
    "Preempt",
    "Request",
    "Reservation",
    "Serve",
    "StartInstance",
    "Steps",
    "Unload",
    "Waiting",
    "drive",
]

GpuKey = tuple[str, int]
"""(node, GPU index)."""
Request: TypeAlias = Any
"""A request's handle, hashable: the scheduler's request id, the simulator's request record. The steps only
count, compare and pass them back."""


class Instance:
    """An instance of a model on one GPU, as the steps see it. The shells subclass it for what they keep
    beside (the scheduler its load measurements, the simulator its running requests' progress)."""

    __slots__ = ("draining", "estimate_s", "gpu", "incoming", "instance_id", "last_used", "memory_bytes",
                 "model", "node", "requests", "state", "waiters")

    def __init__(self, instance_id: str, model: str, node: str, gpu: int, memory_bytes: int, now: float) -> None:
        self.instance_id = instance_id
        self.model = model
        self.node = node
        self.gpu = gpu
        self.memory_bytes = memory_bytes
        self.requests: dict[Request, None] = {}
        """The requests it runs, in the order they came (a dict as an ordered set)."""
        self.waiters: list[Request] = []
        """Requests waiting for it to finish loading."""
        self.last_used = now
        self.draining = False
        """Its requests are being moved off to make room: it takes no new ones."""
        self.incoming = 0
        """Requests on their way here that count against its room before they arrive (the simulator's
        migrations; the scheduler counts a moved request once its node reports it moved)."""
        self.estimate_s = 0.0
        """The start-up estimate of the decision that started it (0: a migration's destination)."""
        self.state = "loading"  # loading, ready, unloading

    @property
    def key(self) -> GpuKey:
        return self.node, self.gpu


@dataclass(frozen=True)
class ModelLimits:
    """What the steps read of a model's configuration."""

    concurrency: int
    """Requests per instance."""
    max_instances: int


@dataclass
class Reservation:
    """A GPU held for a model until the busy instances there have moved away or stopped."""

    model: str
    waiters: list[Request]
    estimate_s: float


@dataclass
class Waiting:
    """A queued request, with the time it first queued (its timeout counts from there)."""

    request: Request
    model: str
    since: float


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Serve:
    """Send ``request`` to ``instance`` (``after_load``: it waited for that instance to load). The steps
    record the request on the instance once this is carried out."""

    instance: Instance
    request: Request
    after_load: bool = False


@dataclass(frozen=True)
class JoinLoad:
    """``request`` waits for ``instance`` to finish loading (already among its waiters)."""

    instance: Instance
    request: Request


@dataclass(frozen=True)
class JoinReserved:
    """``request`` waits for the GPU ``gpu``, reserved for its model, to be freed."""

    gpu: GpuKey
    request: Request


@dataclass(frozen=True)
class Enqueued:
    """``waiting`` joined the queue: nothing can take it now."""

    waiting: Waiting


@dataclass(frozen=True)
class Fail:
    """``request`` cannot be placed at all."""

    request: Request
    code: str
    message: str


@dataclass(frozen=True)
class Decided:
    """``choose`` decided where ``model`` starts, for ``request``: for the log and the counts."""

    model: str
    request: Request
    decision: placement.Decision


@dataclass(frozen=True)
class StartInstance:
    """Load ``instance`` (already counted on its GPU, state ``loading``, its waiters set)."""

    instance: Instance
    why: str


@dataclass(frozen=True)
class Unload:
    """Unload ``instance`` (its state already ``unloading``); the shell calls :meth:`PlacementSteps.remove`
    once it is gone."""

    instance: Instance
    why: str


@dataclass(frozen=True)
class Migrate:
    """Move ``requests`` from ``source`` to ``dest`` (ready, or loading: then once it is ready)."""

    migration_id: str
    source: Instance
    dest: Instance
    requests: list[Request]
    reason: str


@dataclass(frozen=True)
class Preempt:
    """Stop ``requests`` on ``instance`` at once; each is placed again from scratch (its progress lost).
    The instance is unloaded next."""

    instance: Instance
    requests: list[Request]
    why: str


Action = Serve | JoinLoad | JoinReserved | Enqueued | Fail | Decided | StartInstance | Unload | Migrate | Preempt
T = TypeVar("T")
Steps = Generator[Action, None, T]


def drive(steps: Steps[T], carry_out: Callable[[Action], object]) -> T:
    """Run ``steps``, carrying out each action before the next is asked for; return what the steps return."""
    while True:
        try:
            action = next(steps)
        except StopIteration as done:
            return done.value
        carry_out(action)


class ClusterView(Protocol):
    """What the steps read of the cluster from their shell."""

    def need_bytes(self, model: str) -> int:
        """Device bytes an instance of ``model`` takes."""
        ...

    def gpu_views(self, model: str, now: float) -> list[placement.GpuView]:
        """Every GPU of an alive node as it stands ``now``, with the steps' instances on it, for ``choose``
        to place ``model`` (reserved GPUs may be among them: the steps leave them out)."""
        ...


# ---------------------------------------------------------------------------------------------- the steps


class PlacementSteps:
    """The placement steps and the state they decide on. See the module's docstring."""

    def __init__(self, cluster: ClusterView, policy: str, *, migration: bool = True,
                 estimator: placement.Estimator | None = None, rng: random.Random | None = None,
                 make_instance: Callable[[str, str, str, int, int, float], Instance] = Instance,
                 request_order: Callable[[Any], Any] | None = None, skip_stuck_models: bool = False) -> None:
        self.cluster = cluster
        self.policy = placement.placement_policy(policy, migration)
        self.estimator = estimator if estimator is not None else placement.Estimator()
        self.rng = rng if rng is not None else random.Random(0)
        self.make_instance = make_instance
        """Builds an instance record: the shell's subclass of :class:`Instance`."""
        self.request_order = request_order
        """Sort key of the requests that move or stop together (None: the requests' own order)."""
        self.skip_stuck_models = skip_stuck_models
        """In a pass over the queue, try a model that found no room only once: the simulator's shortcut for
        queues of thousands (the placements it skips would all queue again)."""
        self.models: dict[str, ModelLimits] = {}
        self.alive: set[str] = set()
        self.gpus: dict[GpuKey, int] = {}
        """Every GPU, in topology order -> its memory in bytes."""
        self.instances: dict[str, Instance] = {}
        self.by_model: dict[str, list[Instance]] = {}
        self.on_gpu: dict[GpuKey, list[Instance]] = {}
        self.reserved: dict[GpuKey, Reservation] = {}
        self.queue: list[Waiting] = []
        self.closed: set[GpuKey] = set()
        """GPUs that take no new request nor instance (a cordoned node, a poisoned device: policy/health.py);
        the shell keeps it. What runs there goes on."""
        self.no_loads: set[GpuKey] = set()
        """GPUs that start no new instance (their load circuit breaker is open); their instances still serve.
        ``gpu_views`` leaves both sets out for ``choose``; the steps' own searches (migrations) read them here."""
        self._ids = itertools.count(1)
        self.id_prefix = ""
        """Put in every instance and migration id made here: a restarted controller's scheduler sets its epoch
        (``e2.``), so its ids never repeat one its predecessor gave an instance the nodes still run."""

    # ------------------------------------------------------------------ the cluster's shape

    def add_gpu(self, node: str, gpu: int, memory_bytes: int) -> list[Instance]:
        """A GPU, in topology order; returns the list of its instances the steps keep."""
        self.gpus[(node, gpu)] = memory_bytes
        return self.on_gpu.setdefault((node, gpu), [])

    def add_model(self, name: str, limits: ModelLimits) -> None:
        self.models[name] = limits
        self.by_model.setdefault(name, [])

    def free_bytes(self, key: GpuKey) -> int:
        """Memory not held by an instance there, counting those unloading until they are gone."""
        return self.gpus[key] - sum(i.memory_bytes for i in self.on_gpu[key])

    # ------------------------------------------------------------------ instances

    def new_instance(self, model: str, key: GpuKey, waiters: Iterable[Request], now: float) -> Instance:
        """Count a new instance of ``model`` on ``key`` (state ``loading``)."""
        inst = self.make_instance(f"{model}-{self.id_prefix}{next(self._ids)}", model, key[0], key[1],
                                  self.cluster.need_bytes(model), now)
        inst.waiters = list(waiters)
        self.instances[inst.instance_id] = inst
        self.by_model.setdefault(model, []).append(inst)
        self.on_gpu[key].append(inst)
        return inst

    def adopt_instance(self, instance_id: str, model: str, key: GpuKey, memory_bytes: int, requests: Iterable[Request],
                       now: float) -> Instance:
        """Count an instance a node already runs (it re-registered after a controller restart) as ready, with the
        requests it serves."""
        inst = self.make_instance(instance_id, model, key[0], key[1], memory_bytes, now)
        inst.state = "ready"
        inst.requests = dict.fromkeys(requests)
        self.instances[instance_id] = inst
        self.by_model.setdefault(model, []).append(inst)
        self.on_gpu[key].append(inst)
        return inst

    def remove(self, inst: Instance) -> None:
        """``inst`` is gone (unloaded, lost or failed to load)."""
        if self.instances.pop(inst.instance_id, None) is None:
            return
        self.by_model[inst.model].remove(inst)
        self.on_gpu[inst.key].remove(inst)

    @staticmethod
    def is_idle(inst: Instance) -> bool:
        """Ready with nothing running, waiting or on its way: what keep-alive and making room may unload."""
        return inst.state == "ready" and not inst.requests and not inst.waiters and not inst.incoming

    def request_done(self, inst: Instance, request: Request, now: float) -> None:
        """``request`` left ``inst`` (finished, or moved away)."""
        inst.requests.pop(request, None)
        inst.last_used = now

    def unqueue(self, request: Request) -> None:
        self.queue = [w for w in self.queue if w.request != request]

    def expire_queue(self, now: float, timeout_s: float) -> list[Waiting]:
        """Take the requests queued longer than ``timeout_s`` off the queue."""
        expired = [w for w in self.queue if now - w.since > timeout_s]
        if expired:
            self.queue = [w for w in self.queue if now - w.since <= timeout_s]
        return expired

    # ------------------------------------------------------------------ the steps

    def place(self, request: Request, model: str, now: float, exclude: str = "") -> Steps[None]:
        """Place ``request`` for ``model`` (not on instance ``exclude``: the one it just left)."""
        limits = self.models.get(model)
        if limits is None:
            known = ", ".join(sorted(self.models)) or "none"
            yield Fail(request, "unknown_model", f"model {model!r} is not deployed (deployed: {known})")
            return
        room = limits.concurrency
        instances = self.by_model[model]
        best: Instance | None = None
        for i in instances:
            if (i.state == "ready" and not i.draining and i.instance_id != exclude and i.node in self.alive
                    and i.key not in self.closed and len(i.requests) + i.incoming < room
                    and (best is None or len(i.requests) < len(best.requests))):
                best = i
        if best is not None:
            yield from self._serve(best, request, now)
            return
        for i in instances:
            if i.state == "loading" and len(i.waiters) < room and i.key not in self.closed:
                i.waiters.append(request)
                yield JoinLoad(i, request)
                return
        for key, reservation in self.reserved.items():
            if reservation.model == model and len(reservation.waiters) < room:
                reservation.waiters.append(request)
                yield JoinReserved(key, request)
                return
        if (yield from self.start_instance(model, request, now)):
            return
        yield from self._enqueue(Waiting(request, model, now))

    def start_instance(self, model: str, first_waiter: Request, now: float) -> Steps[bool]:
        """Start an instance of ``model`` for ``first_waiter`` where ``choose`` says; False: none can start."""
        limits = self.models[model]
        if sum(1 for i in self.by_model[model] if i.state != "unloading") >= limits.max_instances:
            return False
        need = self.cluster.need_bytes(model)
        views = self.cluster.gpu_views(model, now)
        if self.reserved:
            views = [v for v in views if v.key not in self.reserved]
        decision = placement.choose(self.policy, model, need, views, self.estimator, self.rng)  # type: ignore[arg-type]
        yield Decided(model, first_waiter, decision)
        if decision.kind == "wait" or decision.gpu is None:
            return False
        key = decision.gpu
        for instance_id in decision.evict:
            inst = self.instances.get(instance_id)
            if inst is not None:
                yield from self._unload(inst, f"to make room for {model}")
        if decision.kind == "load":
            inst = self.new_instance(model, key, [first_waiter], now)
            inst.estimate_s = decision.estimate_s
            yield StartInstance(inst, f"for {first_waiter}")
            return True
        # migrate (ServerlessLLM) or preempt (Shepherd): free the GPU, then load there.
        self.reserved[key] = Reservation(model, [first_waiter], decision.estimate_s)
        yield JoinReserved(key, first_waiter)
        # Whole instances move to one destination each; a split one (no destination had room for all its
        # requests) moves in parts, each to a ready instance of its model with free slots. Requests are
        # matched to the ids ``choose`` saw by ``str``.
        parts: list[tuple[str, tuple[str, int], list[Request] | None]] = [
            (instance_id, dest, None) for instance_id, dest in decision.move]
        for instance_id, dest, ids in decision.split:
            busy = self.instances.get(instance_id)
            if busy is not None:
                wanted = set(ids)
                parts.append((instance_id, dest, [r for r in self._ordered(busy.requests) if str(r) in wanted]))
        # The busy instances ``choose`` waits for rather than moves take no new request; the model loads once
        # they and the moved ones are gone (see try_reserved).
        for instance_id in decision.drain:
            stays = self.instances.get(instance_id)
            if stays is not None:
                stays.draining = True
        for instance_id, dest, requests in parts:
            busy = self.instances.get(instance_id)
            if busy is None or key not in self.reserved:
                continue
            busy.draining = True
            if decision.kind == "migrate":
                todo = self._ordered(busy.requests) if requests is None else requests
                moved = (yield from self.migrate(todo, busy, dest, f"make room for {model}", now)) if todo else ""
                if moved is None:
                    # The GPU will not be freed: give the reservation up, its waiters queue instead.
                    busy.draining = False
                    yield from self.release(key, now)
            elif busy.state != "unloading":
                requests = self._ordered(busy.requests)
                yield Preempt(busy, requests, f"preempted for {model}")
                busy.requests.clear()
                yield from self._unload(busy, f"preempted for {model}")
        yield from self.try_reserved(now)
        return True

    def try_reserved(self, now: float) -> Steps[None]:
        """Load each reserved model once its GPU has been freed by migrations or preemptions."""
        for key, reservation in list(self.reserved.items()):
            if reservation.model not in self.models:
                del self.reserved[key]
                continue
            on_gpu = list(self.on_gpu[key])
            if any(i.draining and i.requests for i in on_gpu):
                continue
            for inst in on_gpu:
                if inst.draining and inst.state == "ready":
                    yield from self._unload(inst, f"its requests moved away for {reservation.model}")
            del self.reserved[key]
            if key[0] not in self.alive or key in self.closed or key in self.no_loads:
                for request in reservation.waiters:
                    yield from self.place(request, reservation.model, now)
                continue
            inst = self.new_instance(reservation.model, key, reservation.waiters, now)
            inst.estimate_s = reservation.estimate_s
            yield StartInstance(inst, "on the GPU freed for it")

    def release(self, key: GpuKey, now: float) -> Steps[None]:
        """The GPU ``key`` will not be freed: its reservation's waiters queue (and may choose again), and the
        instances there that were to leave it take requests again."""
        reservation = self.reserved.pop(key, None)
        if reservation is None:
            return
        for inst in self.on_gpu.get(key, ()):
            inst.draining = False
        for request in reservation.waiters:
            yield from self._enqueue(Waiting(request, reservation.model, now))

    def migrate(self, requests: list[Request], source: Instance, where: tuple[str, int | None], reason: str,
                now: float) -> Steps[str | None]:
        """Move ``requests`` of ``source`` to an instance of its model at ``where`` (a node, and a GPU or
        None for any), loading one there if needed; the migration's id, or None: no room there."""
        room = self.models[source.model].concurrency
        dest = next(
            (i for i in self.by_model[source.model]
             if i.node == where[0] and (where[1] is None or i.gpu == where[1]) and i is not source
             and i.state in ("ready", "loading") and i.key not in self.closed
             and len(i.requests) + len(i.waiters) + i.incoming + len(requests) <= room),
            None,
        )
        if dest is None:
            need = self.cluster.need_bytes(source.model)
            key = self._find_gpu(need, where)
            if key is None:
                key = yield from self._make_room(need, where)
            if key is None:
                return None
            dest = self.new_instance(source.model, key, [], now)
            yield StartInstance(dest, f"as the destination of a migration ({reason})")
        migration_id = f"mig-{self.id_prefix}{next(self._ids)}"
        yield Migrate(migration_id, source, dest, list(requests), reason)
        return migration_id

    def ready(self, inst: Instance, now: float) -> Steps[None]:
        """``inst`` finished loading: it serves the requests that waited for it."""
        inst.state = "ready"
        inst.last_used = now  # keep-alive counts from ready, not from the order to load
        waiters, inst.waiters = inst.waiters, []
        for request in waiters:
            yield from self._serve(inst, request, now, after_load=True)

    def freed(self, inst: Instance | None, now: float) -> Steps[None]:
        """Room appeared (on ``inst``, if given: a request left it): reserved GPUs, then the queue."""
        if inst is not None and inst.draining:
            yield from self.try_reserved(now)
        yield from self.drain_queue(now)

    def drain_queue(self, now: float) -> Steps[None]:
        """Try the reserved GPUs, then place every queued request again, oldest first."""
        yield from self.try_reserved(now)
        waiting, self.queue = self.queue, []
        stuck: set[str] = set()
        for w in waiting:
            if w.model in stuck:
                self.queue.append(w)
                continue
            before = len(self.queue)
            yield from self.place(w.request, w.model, now)
            if len(self.queue) > before:
                self.queue[-1] = w  # still waiting: keep its original arrival time for the timeout
                if self.skip_stuck_models:
                    stuck.add(w.model)

    # ------------------------------------------------------------------ helpers

    def _serve(self, inst: Instance, request: Request, now: float, after_load: bool = False) -> Steps[None]:
        yield Serve(inst, request, after_load)
        inst.requests[request] = None
        inst.last_used = now

    def _enqueue(self, waiting: Waiting) -> Steps[None]:
        self.queue.append(waiting)
        yield Enqueued(waiting)

    def _unload(self, inst: Instance, why: str) -> Steps[None]:
        inst.state = "unloading"
        yield Unload(inst, why)

    def _ordered(self, requests: Iterable[Request]) -> list[Request]:
        return sorted(requests, key=self.request_order)

    def _where(self, where: tuple[str, int | None] | None) -> list[GpuKey]:
        """The GPUs of alive nodes at ``where`` (None: anywhere), in topology order."""
        return [key for key in self.gpus if key[0] in self.alive and key not in self.closed
                and key not in self.no_loads and (
            where is None or (key[0] == where[0] and (where[1] is None or key[1] == where[1])))]

    def _find_gpu(self, need: int, where: tuple[str, int | None] | None = None) -> GpuKey | None:
        return next((key for key in self._where(where) if self.free_bytes(key) >= need), None)

    def _make_room(self, need: int, where: tuple[str, int | None] | None = None) -> Steps[GpuKey | None]:
        """Unload idle instances (least recently used first) on the first GPU where that frees enough."""
        for key in self._where(where):
            free = self.free_bytes(key)
            idle = sorted((i for i in self.on_gpu[key] if self.is_idle(i)), key=lambda i: i.last_used)
            if free + sum(i.memory_bytes for i in idle) < need:
                continue
            for inst in idle:
                if free >= need:
                    break
                yield from self._unload(inst, "to make room")
                free += inst.memory_bytes
            return key
        return None
