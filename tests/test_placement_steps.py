"""The placement steps without actors: each step of PlacementSteps, and the actions it returns, on a small
cluster described by hand (two nodes of one GPU of 10 GB, models of 6 GB)."""

from __future__ import annotations

from typing import Any

from sllm_actors.policy import placement, steps

GB = 10**9


class Cluster:
    """A ClusterView over the steps' own instances: node -> tier -> models held, every model 6 GB."""

    def __init__(self, holds: dict[str, dict[str, set[str]]]) -> None:
        self.holds = holds
        self.steps: steps.PlacementSteps | None = None
        self.remaining: dict[str, int] = {}
        """request -> tokens it has left (unknown where absent)."""

    def need_bytes(self, model: str) -> int:
        return 6 * GB

    def gpu_views(self, model: str, now: float) -> list[placement.GpuView]:
        assert self.steps is not None
        views = []
        for (node, gpu), memory in self.steps.gpus.items():
            if node not in self.steps.alive:
                continue
            instances = [placement.InstanceView(i.instance_id, i.model, "migrating" if i.draining else i.state,
                                                [placement.RunningView(str(r), 10, self.remaining.get(str(r), -1))
                                                 for r in i.requests],
                                                i.memory_bytes, self.steps.models[i.model].concurrency)
                         for i in self.steps.on_gpu[(node, gpu)]]
            views.append(placement.GpuView(node, gpu, memory, instances, holds=self.holds.get(node, {}), now=now))
        return views


def make(policy: str = "serverlessllm", holds: dict[str, dict[str, set[str]]] | None = None,
         concurrency: int = 2, max_instances: int = 4) -> steps.PlacementSteps:
    cluster = Cluster(holds or {})
    core = steps.PlacementSteps(cluster, policy, estimator=placement.Estimator({"a": 6 * GB, "b": 6 * GB}))
    cluster.steps = core
    for node in ("n1", "n2"):
        core.add_gpu(node, 0, 10 * GB)
        core.alive.add(node)
    for model in ("a", "b"):
        core.add_model(model, steps.ModelLimits(concurrency, max_instances))
    return core


def run(todo: steps.Steps[Any]) -> list[steps.Action]:
    done: list[steps.Action] = []
    steps.drive(todo, done.append)
    return done


def kinds(actions: list[steps.Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def ready_instance(core: steps.PlacementSteps, model: str, node: str, *requests: str) -> steps.Instance:
    inst = core.new_instance(model, (node, 0), [], 0.0)
    run(core.ready(inst, 0.0))
    for r in requests:
        inst.requests[r] = None
    return inst


def test_a_ready_instance_with_room_serves_the_one_with_fewest_requests_first() -> None:
    core = make()
    busy = ready_instance(core, "a", "n1", "r1")
    idle = ready_instance(core, "a", "n2")
    actions = run(core.place("r2", "a", 5.0))
    assert actions == [steps.Serve(idle, "r2")]
    assert list(idle.requests) == ["r2"] and idle.last_used == 5.0
    # Excluded (the instance it just left), draining or full instances take no request.
    idle.draining = True
    busy.requests["r3"] = None
    assert kinds(run(core.place("r4", "a", 6.0, exclude=busy.instance_id))) == ["Decided", "Enqueued"]


def test_a_request_waits_on_a_loading_instance_then_is_served_when_it_is_ready() -> None:
    core = make()
    loading = core.new_instance("a", ("n1", 0), [], 0.0)
    assert run(core.place("r1", "a", 1.0)) == [steps.JoinLoad(loading, "r1")]
    assert loading.waiters == ["r1"]
    actions = run(core.ready(loading, 2.0))
    assert actions == [steps.Serve(loading, "r1", after_load=True)]
    assert loading.state == "ready" and loading.waiters == [] and list(loading.requests) == ["r1"]


def test_with_no_instance_a_new_one_starts_where_choose_says() -> None:
    core = make(holds={"n2": {"dram": {"a"}}})
    actions = run(core.place("r1", "a", 0.0))
    assert kinds(actions) == ["Decided", "StartInstance"]
    decided, start = actions
    assert isinstance(decided, steps.Decided) and decided.decision.kind == "load"
    assert isinstance(start, steps.StartInstance)
    inst = start.instance
    assert (inst.node, inst.state, inst.waiters) == ("n2", "loading", ["r1"])  # n2 holds it in DRAM
    assert inst.estimate_s == decided.decision.estimate_s > 0
    assert core.on_gpu[("n2", 0)] == [inst] and core.by_model["a"] == [inst]


def test_idle_instances_of_other_models_are_unloaded_to_make_room() -> None:
    core = make()
    idle_b = [ready_instance(core, "b", "n1"), ready_instance(core, "b", "n2")]
    actions = run(core.place("r1", "a", 0.0))
    assert kinds(actions) == ["Decided", "Unload", "StartInstance"]
    unloaded = actions[1]
    assert isinstance(unloaded, steps.Unload) and unloaded.instance in idle_b
    assert unloaded.instance.state == "unloading"
    # The shell reports it gone: its room is free again.
    core.remove(unloaded.instance)
    assert unloaded.instance.instance_id not in core.instances


def test_no_room_queues_then_room_drains_the_queue_and_the_timeout_expires_the_rest() -> None:
    core = make()
    # Both instances full: their requests have nowhere to move.
    busy = [ready_instance(core, "b", "n1", "x1", "x3"), ready_instance(core, "b", "n2", "x2", "x4")]
    actions = run(core.place("r1", "a", 1.0))
    assert kinds(actions) == ["Decided", "Enqueued"]
    assert [w.request for w in core.queue] == ["r1"]
    run(core.place("r2", "a", 2.0))
    # A request leaves: the idle instance makes room, the queue's first request starts a load, the second
    # waits on that load; their original queue times are kept for the timeout.
    core.request_done(busy[0], "x1", 3.0)
    core.request_done(busy[0], "x3", 3.0)
    actions = run(core.freed(busy[0], 3.0))
    assert kinds(actions) == ["Decided", "Unload", "StartInstance", "JoinLoad"]
    assert core.queue == []
    assert kinds(run(core.place("r3", "a", 4.0))) == ["Decided", "Enqueued"]  # the load is full
    assert core.expire_queue(9.0, 5.0) == [] and [w.request for w in core.queue] == ["r3"]
    assert [w.request for w in core.expire_queue(9.5, 5.0)] == ["r3"] and core.queue == []


def test_an_unknown_model_fails_and_the_instance_limit_queues() -> None:
    core = make(max_instances=1, concurrency=1)
    assert run(core.place("r1", "zzz", 0.0)) == [
        steps.Fail("r1", "unknown_model", "model 'zzz' is not deployed (deployed: a, b)")]
    ready_instance(core, "a", "n1", "x")
    assert kinds(run(core.place("r2", "a", 0.0))) == ["Enqueued"]  # one instance, full: no Decided


def test_migration_makes_room_on_the_gpu_that_holds_the_model_then_it_loads_there() -> None:
    # n1 holds b in DRAM but runs a; n2 holds a in DRAM: moving a to n2 beats loading b from the repository.
    core = make(holds={"n1": {"dram": {"b"}}, "n2": {"dram": {"a"}}})
    busy = ready_instance(core, "a", "n1", "x1")
    actions = run(core.place("r1", "b", 0.0))
    assert kinds(actions) == ["Decided", "JoinReserved", "StartInstance", "Migrate"]
    assert actions[0].decision.kind == "migrate"  # type: ignore[union-attr]
    assert core.reserved[("n1", 0)].waiters == ["r1"] and busy.draining
    migrate = actions[3]
    assert isinstance(migrate, steps.Migrate) and migrate.source is busy and migrate.requests == ["x1"]
    assert migrate.dest.node == "n2" and migrate.dest.state == "loading" and migrate.migration_id.startswith("mig-")
    # Another request for b waits on the reservation.
    assert run(core.place("r2", "b", 0.5)) == [steps.JoinReserved(("n1", 0), "r2")]
    # The request moved: the drained instance goes and b loads on the GPU freed for it, with both waiters.
    core.request_done(busy, "x1", 1.0)
    actions = run(core.freed(busy, 1.0))
    assert kinds(actions) == ["Unload", "StartInstance"]
    start = actions[1]
    assert isinstance(start, steps.StartInstance) and start.instance.key == ("n1", 0)
    assert start.instance.waiters == ["r1", "r2"] and core.reserved == {}


def test_a_move_that_cannot_start_gives_the_reservation_up_and_its_waiters_queue(monkeypatch: Any) -> None:
    core = make(holds={"n1": {"dram": {"b"}}, "n2": {"dram": {"a"}}}, concurrency=1)
    busy = ready_instance(core, "a", "n1", "x1")
    ready_instance(core, "b", "n2", "y1")  # n2 has no room for a, whatever choose decided, and b is full
    decision = placement.Decision("migrate", ("n1", 0), 1.0, "dram", move=[(busy.instance_id, ("n2", 0))])
    monkeypatch.setattr(placement, "choose", lambda *args, **kwargs: decision)
    actions = run(core.place("r1", "b", 0.0))
    assert kinds(actions) == ["Decided", "JoinReserved", "Enqueued"]
    assert not busy.draining and core.reserved == {} and [w.request for w in core.queue] == ["r1"]


def test_preemption_stops_the_busy_instance_and_loads_at_once() -> None:
    core = make(policy="shepherd", holds={"n1": {"dram": {"b"}}, "n2": {"dram": {"a"}}})
    busy = ready_instance(core, "a", "n1", "x1", "x2")
    actions = run(core.place("r1", "b", 0.0))
    assert kinds(actions) == ["Decided", "JoinReserved", "Preempt", "Unload", "StartInstance"]
    preempt = actions[2]
    assert isinstance(preempt, steps.Preempt) and preempt.instance is busy and preempt.requests == ["x1", "x2"]
    assert busy.state == "unloading" and not busy.requests
    start = actions[4]
    assert isinstance(start, steps.StartInstance) and start.instance.key == ("n1", 0)
    assert start.instance.waiters == ["r1"]


def test_an_explicit_migration_loads_a_destination_making_room_or_reports_none() -> None:
    core = make()
    src = ready_instance(core, "a", "n1", "x1")
    idle_b = ready_instance(core, "b", "n2")
    moved = run(core.migrate(["x1"], src, ("n2", None), "operator", 0.0))
    assert kinds(moved) == ["Unload", "StartInstance", "Migrate"]
    assert moved[0].instance is idle_b  # type: ignore[union-attr]
    # A second move to the same GPU joins the destination already loading there.
    again = run(core.migrate(["x1"], src, ("n2", 0), "again", 0.0))
    assert kinds(again) == ["Migrate"] and again[0].dest is moved[1].instance  # type: ignore[union-attr]
    # Its own GPU has no room beside it, and nothing idle to unload.
    assert steps.drive(core.migrate(["x1"], src, ("n1", 0), "nowhere", 0.0), lambda action: None) is None


def test_idle_is_ready_with_nothing_running_waiting_or_on_its_way() -> None:
    core = make()
    inst = ready_instance(core, "a", "n1")
    assert core.is_idle(inst)
    inst.incoming = 1
    assert not core.is_idle(inst)


def test_requests_with_no_single_destination_move_in_parts_then_the_freed_gpu_loads() -> None:
    # n1 holds b in DRAM and runs a with x1, x2 (full); n2 and n3 run a with one free slot each and have no
    # room for another instance: x1 and x2 move, one to each, with no load, then b loads on n1.
    core = make(holds={"n1": {"dram": {"b"}}})
    core.add_gpu("n3", 0, 10 * GB)
    core.alive.add("n3")
    busy = ready_instance(core, "a", "n1", "x1", "x2")
    on_n2, on_n3 = ready_instance(core, "a", "n2", "y1"), ready_instance(core, "a", "n3", "z1")
    actions = run(core.place("r1", "b", 0.0))
    assert kinds(actions) == ["Decided", "JoinReserved", "Migrate", "Migrate"]
    assert actions[0].decision.split  # type: ignore[union-attr]
    moves = [(m.dest, m.requests) for m in actions[2:] if isinstance(m, steps.Migrate) and m.source is busy]
    assert moves == [(on_n2, ["x1"]), (on_n3, ["x2"])] and busy.draining
    for request in ("x1", "x2"):
        core.request_done(busy, request, 1.0)
    actions = run(core.freed(busy, 1.0))
    assert kinds(actions) == ["Unload", "StartInstance"]
    assert actions[1].instance.key == ("n1", 0) and actions[1].instance.waiters == ["r1"]  # type: ignore[union-attr]


def test_a_wait_for_a_gpu_about_to_free_queues_the_request_and_loads_there_once_it_is_free() -> None:
    # n1 holds b in DRAM and runs a's x1, 2 tokens from its end; n2 has room but b only in the repository.
    core = make(holds={"n1": {"dram": {"b"}}})
    busy = ready_instance(core, "a", "n1", "x1")
    core.cluster.remaining["x1"] = 2  # type: ignore[attr-defined]
    actions = run(core.place("r1", "b", 0.0))
    assert kinds(actions) == ["Decided", "Enqueued"]
    decision = actions[0].decision  # type: ignore[union-attr]
    assert (decision.kind, decision.gpu) == ("wait", ("n1", 0))
    core.request_done(busy, "x1", 0.1)
    actions = run(core.freed(busy, 0.1))
    assert kinds(actions) == ["Decided", "Unload", "StartInstance"]
    assert actions[2].instance.key == ("n1", 0)  # type: ignore[union-attr]
    # With x1 far from done (its budget unknown: 128 tokens, at a measured 10 s a step), the repository load
    # on n2 (60 s) is cheaper than that wait: it starts at once.
    core = make(holds={"n1": {"dram": {"b"}}})
    ready_instance(core, "a", "n1", "x1")
    core.estimator.observe_step("a", "n1", 10.0)
    actions = run(core.place("r1", "b", 0.0))
    assert kinds(actions) == ["Decided", "StartInstance"]
    assert (actions[0].decision.kind, actions[0].decision.gpu) == ("load", ("n2", 0))  # type: ignore[union-attr]


def test_a_busy_instance_not_worth_moving_is_waited_for_beside_the_one_that_moves() -> None:
    # n3 (10 GB) holds b in DRAM and runs a (x1, 1 token left; 4 GB) and c (x2, 1,000 left; 6 GB): b needs both
    # gone. n2 holds a and c in DRAM and has room for one of them; n1 has room, b only in the repository
    # (60 s). c moves to n2; a, done sooner than its move would be, is waited for: it takes no new request,
    # and b loads once both have left.
    core = make(holds={"n2": {"dram": {"a", "c"}}, "n3": {"dram": {"b"}}})
    core.add_gpu("n3", 0, 10 * GB)
    core.alive.add("n3")
    core.add_model("c", steps.ModelLimits(2, 4))
    core.estimator.model_bytes["c"] = 6 * GB
    stays = core.new_instance("a", ("n3", 0), [], 0.0)
    moves = core.new_instance("c", ("n3", 0), [], 0.0)
    stays.memory_bytes = 4 * GB
    for inst, request in ((stays, "x1"), (moves, "x2")):
        run(core.ready(inst, 0.0))
        inst.requests[request] = None
    core.cluster.remaining.update({"x1": 1, "x2": 1000})  # type: ignore[attr-defined]
    actions = run(core.place("r1", "b", 0.0))
    assert kinds(actions) == ["Decided", "JoinReserved", "StartInstance", "Migrate"]
    decision = actions[0].decision  # type: ignore[union-attr]
    assert (decision.kind, decision.gpu, decision.drain) == ("migrate", ("n3", 0), [stays.instance_id])
    migrate = actions[3]
    assert isinstance(migrate, steps.Migrate) and migrate.source is moves and migrate.dest.node == "n2"
    assert stays.draining and moves.draining
    # a's request finishes where it is; c's has not moved yet: b waits.
    core.request_done(stays, "x1", 0.5)
    assert run(core.freed(stays, 0.5)) == []
    core.request_done(moves, "x2", 1.0)
    actions = run(core.freed(moves, 1.0))
    assert kinds(actions) == ["Unload", "Unload", "StartInstance"]
    assert {a.instance for a in actions[:2]} == {stays, moves}  # type: ignore[union-attr]
    assert actions[2].instance.key == ("n3", 0) and actions[2].instance.waiters == ["r1"]  # type: ignore[union-attr]


def test_a_reservation_given_up_lets_the_instances_it_waited_for_take_requests_again(monkeypatch: Any) -> None:
    core = make(holds={"n1": {"dram": {"b"}}, "n2": {"dram": {"a"}}}, concurrency=1)
    core.add_model("c", steps.ModelLimits(1, 4))
    core.gpus[("n1", 0)] = 12 * GB
    busy = ready_instance(core, "a", "n1", "x1")
    stays = ready_instance(core, "c", "n1", "x2")
    ready_instance(core, "b", "n2", "y1")  # n2 has no room for a, whatever choose decided, and b is full
    decision = placement.Decision("migrate", ("n1", 0), 1.0, "dram", move=[(busy.instance_id, ("n2", 0))],
                                  drain=[stays.instance_id])
    monkeypatch.setattr(placement, "choose", lambda *args, **kwargs: decision)
    assert kinds(run(core.place("r1", "b", 0.0))) == ["Decided", "JoinReserved", "Enqueued"]
    assert not busy.draining and not stays.draining and core.reserved == {}
