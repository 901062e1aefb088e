"""Placement decisions in constructed situations (pure code: the same the scheduler and simulator run)."""

from __future__ import annotations

import random

import pytest

from sllm_actors.policy.placement import (
    CPU_CONTENTION,
    DEFAULT_REMAINING_TOKENS,
    DEFAULT_STEP_S,
    Estimator,
    GpuView,
    InstanceView,
    LoadFit,
    LoadUnderWay,
    MigrationCost,
    RunningView,
    choose,
    load_parts,
    pipeline_wait_s,
)

GB = 1_000_000_000


def _gpu(node: str, *, holds: dict[str, set[str]] | None = None, instances: list[InstanceView] | None = None,
         memory: int = 10 * GB, loading_s: float = 0.0) -> GpuView:
    return GpuView(node, 0, memory, instances or [], tiers={"dram": 20 * GB, "ssd": 2 * GB, "repository": 0.2 * GB},
                   holds=holds or {}, loading_s=loading_s)


def _busy(model: str, tokens: int = 100, memory: int = 6 * GB) -> InstanceView:
    return InstanceView(f"{model}-1", model, "ready", [RunningView("r1", tokens)], memory)


@pytest.fixture
def est() -> Estimator:
    return Estimator({"m": 4 * GB, "a": 6 * GB})


def test_start_up_estimate_uses_the_fastest_tier_holding_the_model(est: Estimator) -> None:
    assert est.load_s("m", _gpu("n", holds={"dram": {"m"}, "ssd": {"m"}})) == pytest.approx(0.2)
    assert est.load_s("m", _gpu("n", holds={"ssd": {"m"}})) == pytest.approx(2.0)
    assert est.load_s("m", _gpu("n")) == pytest.approx(20.0)  # no local copy: the repository
    assert est.load_s("m", _gpu("n", holds={"ssd": {"m"}}, loading_s=3.0)) == pytest.approx(5.0)  # queue term


def test_locality_picks_the_server_with_the_model_in_dram(est: Estimator) -> None:
    gpus = [_gpu("far"), _gpu("ssd", holds={"ssd": {"m"}}), _gpu("near", holds={"dram": {"m"}})]
    d = choose("serverlessllm", "m", 4 * GB, gpus, est)
    assert (d.kind, d.gpu, d.tier) == ("load", ("near", 0), "dram")
    assert len(d.considered) == 3
    assert choose("availability", "m", 4 * GB, gpus, est).gpu == ("far", 0), "availability ignores locality"


def test_model_in_dram_on_a_busy_server_migrates_when_that_wins(est: Estimator) -> None:
    # "near" holds m in DRAM but runs a; "free" has room but only the repository for m.
    near = _gpu("near", holds={"dram": {"m"}}, instances=[_busy("a")])
    free = _gpu("free", holds={"dram": {"a"}})
    d = choose("serverlessllm", "m", 6 * GB, [near, free], est)
    assert d.kind == "migrate" and d.gpu == ("near", 0)
    assert d.move == [("a-1", ("free", 0))]
    assert d.estimate_s < est.load_s("m", free)
    p = choose("shepherd", "m", 6 * GB, [near, free], est)
    assert p.kind == "preempt" and p.move == [("a-1", ("free", 0))]
    w = choose("locality-wait", "m", 6 * GB, [near, free], est)
    assert w.kind == "load" and w.gpu == ("free", 0)


def test_a_free_gpu_with_ssd_copy_beats_a_costly_migration(est: Estimator) -> None:
    est.migration["a"] = MigrationCost(a=0.01, b=1.0)  # long contexts are slow to recompute
    near = _gpu("near", holds={"dram": {"m"}}, instances=[_busy("a", tokens=4000)])
    free = _gpu("free", holds={"ssd": {"m", "a"}})
    d = choose("serverlessllm", "m", 6 * GB, [near, free], est)
    assert (d.kind, d.gpu) == ("load", ("free", 0))


def test_nothing_fits_means_wait(est: Estimator) -> None:
    gpus = [_gpu("n", instances=[_busy("a", memory=9 * GB)])]
    assert choose("serverlessllm", "m", 4 * GB, gpus, est).kind == "wait"
    assert choose("random", "m", 4 * GB, gpus, est, random.Random(1)).kind == "wait"


def test_idle_instances_are_evicted_least_needed_first(est: Estimator) -> None:
    idle = InstanceView("old-1", "old", "ready", [], 8 * GB)
    d = choose("serverlessllm", "m", 4 * GB, [_gpu("n", instances=[idle])], est)
    assert d.kind == "load" and d.evict == ["old-1"]


def test_migration_cost_is_fitted_from_observed_resumes() -> None:
    cost = MigrationCost()
    for tokens in (100, 400, 1600, 3200):
        cost.observe(tokens, 0.002 * tokens + 0.1)
    assert cost.a == pytest.approx(0.002, rel=1e-6)
    assert cost.b == pytest.approx(0.1, rel=1e-6)
    assert cost.estimate(1000) == pytest.approx(2.1)


def test_random_policy_is_seeded(est: Estimator) -> None:
    gpus = [_gpu(f"n{i}") for i in range(8)]
    a = [choose("random", "m", GB, gpus, est, random.Random(5)).gpu for _ in range(3)]
    b = [choose("random", "m", GB, gpus, est, random.Random(5)).gpu for _ in range(3)]
    assert a == b


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def test_the_queue_term_counts_only_what_a_node_serializes() -> None:
    clock = FakeClock()
    t0 = clock.now
    fetching = [LoadUnderWay(t0, fetch_s=6.0, build_s=2.0)]  # a repository load: fetch to t0+6, build to t0+8
    now = clock.advance(1.0)
    # A DRAM or SSD load asks for the build lock long before that fetch ends: it waits for nothing.
    assert pipeline_wait_s(fetching, now) == 0.0
    # Another repository load: its fetch waits 5 s for the one ahead, then its build 1 s for that load's build.
    assert pipeline_wait_s(fetching, now, fetch_s=1.0) == pytest.approx(5.0 + 1.0)
    # A long fetch of its own: the other's build is done by the time this one's starts.
    assert pipeline_wait_s(fetching, now, fetch_s=10.0) == pytest.approx(5.0)

    building = [LoadUnderWay(t0, build_s=4.0), LoadUnderWay(t0 + 0.5, build_s=2.0)]  # two builds queued
    assert pipeline_wait_s(building, now) == pytest.approx(3.0 + 2.0)
    assert pipeline_wait_s(building, clock.advance(4.0)) == pytest.approx(1.0)
    # Both outran their estimates: they delay nothing, never less than nothing.
    assert pipeline_wait_s(building, clock.advance(100.0)) == 0.0


def test_a_load_splits_into_fetch_build_and_tail() -> None:
    assert load_parts("repository", 20.0, 0.2) == pytest.approx((19.8, 0.2, 0.0))
    assert load_parts("ssd", 2.0, 0.2) == pytest.approx((0.0, 0.2, 1.8))
    assert load_parts("dram", 0.2, 0.2) == pytest.approx((0.0, 0.2, 0.0))
    assert load_parts("ssd", 0.1, 0.2) == pytest.approx((0.0, 0.1, 0.0))  # never more than the whole


def test_a_start_up_estimate_waits_for_the_queue_on_the_fake_clock(est: Estimator) -> None:
    clock = FakeClock()
    ssd = _gpu("n1", holds={"ssd": {"m"}})
    parts = est.load_parts("m", ssd)  # 4 GB: built as from DRAM (0.2 s), the rest of its 2 s outside the lock
    assert parts == pytest.approx((0.0, 0.2, 1.8))
    under_way = (LoadUnderWay(clock.now, *parts),)
    for elapsed, queued in ((0.0, 0.2), (0.1, 0.1), (0.1, 0.0), (2.0, 0.0)):
        gpu = _gpu("n1", holds={"ssd": {"m"}})
        gpu.loads, gpu.now = under_way, clock.advance(elapsed)
        assert est.load_s("m", gpu) == pytest.approx(queued + 4 * GB / (2 * GB)), clock.now
    # A repository load under way holds up a new repository load by its whole fetch, a DRAM one by nothing.
    fetch = (LoadUnderWay(clock.now, *est.load_parts("m", _gpu("n1"))),)
    repo, dram = _gpu("n1"), _gpu("n1", holds={"dram": {"m"}})
    repo.loads = dram.loads = fetch
    repo.now = dram.now = clock.advance(1.0)
    assert est.load_s("m", repo) == pytest.approx((19.8 - 1.0) + 20.0)
    assert est.load_s("m", dram) == pytest.approx(0.2)


def test_the_load_overhead_is_learned_from_measured_loads(est: Estimator) -> None:
    # A 4 GB load from a 2 GB/s tier that took 3 s: 1 s beyond moving the bytes; then a moving average.
    est.observe_load(3.0, 4 * GB, 2 * GB)
    assert est.load_overhead_s == pytest.approx(1.0)
    est.observe_load(2.0, 4 * GB, 2 * GB)  # no overhead this time
    assert est.load_overhead_s == pytest.approx(0.7)
    gpu = _gpu("n1", holds={"ssd": {"m"}})
    assert est.load_s("m", gpu) == pytest.approx(0.7 + 2.0)


def test_tier_bandwidth_is_refined_from_real_loads() -> None:
    from sllm_actors.actors.node.tier_common import Bandwidth

    bw = Bandwidth(1 * GB)  # measured at start
    bw.observe(2 * GB, 1.0)  # a real load ran at 2 GB/s
    assert bw.value == pytest.approx(1.3 * GB)
    bw.observe(0, 1.0)  # nothing moved: ignored
    assert bw.value == pytest.approx(1.3 * GB)


def test_a_tier_fit_separates_the_fixed_part_from_the_bandwidth() -> None:
    fit = LoadFit()
    fit.observe(1 * GB, 0.5 + 1.0)  # 0.5 s fixed + 1 GB at 1 GB/s
    # One size seen: the fixed part is its residual over the measured bandwidth.
    assert fit.predict(1 * GB, 2 * GB) == pytest.approx(1.0 + 0.5)
    fit.observe(GB // 10, 0.5 + 0.1)
    fit.observe(GB // 2, 0.5 + 0.5)
    assert fit.bytes_per_s == pytest.approx(1 * GB) and fit.fixed_s == pytest.approx(0.5)
    assert fit.predict(4 * GB, 20 * GB) == pytest.approx(4.5)  # the fit, not the measured bandwidth


def test_the_estimator_uses_the_tier_fit_and_lends_it_to_other_nodes(est: Estimator) -> None:
    for nbytes, seconds in ((GB, 1.2), (3 * GB, 1.6)):  # DRAM on n1: 1 s fixed + 5 GB/s
        est.observe_tier_load("n1", "dram", nbytes, seconds)
    here, there = _gpu("n1", holds={"dram": {"m"}}), _gpu("n2", holds={"dram": {"m"}}, loading_s=2.0)
    assert est.load_s("m", here) == pytest.approx(1.0 + 4 * GB / (5 * GB))
    assert est.load_s("m", there) == pytest.approx(2.0 + 1.0 + 4 * GB / (5 * GB))
    # A tier with no fit yet: the shared overhead and the tier's measured bandwidth.
    est.load_overhead_s = 0.3
    assert est.load_s("m", _gpu("n1", holds={"ssd": {"m"}})) == pytest.approx(0.3 + 4 * GB / (2 * GB))


# ------------------------------------------------------------------ the decisions issue 19's traces exposed


def _running(model: str, node: str, *remaining: int, memory: int = 6 * GB, slots: int = 4) -> InstanceView:
    """A ready instance of ``model`` running one request per entry of ``remaining`` (tokens left)."""
    return InstanceView(f"{model}-{node}", model, "ready",
                        [RunningView(f"{node}-r{k}", 100, left) for k, left in enumerate(remaining)], memory, slots)


def test_a_busy_gpu_is_waited_for_only_when_it_frees_sooner_than_a_load_elsewhere(est: Estimator) -> None:
    # "near" holds m in DRAM (0.2 s) but runs a; "far" has room, m only in the repository (20 s); moving a to
    # "far" means loading a from the repository too (30 s). Waiting costs a's remaining tokens x step time.
    def gpus(left: int) -> list[GpuView]:
        return [_gpu("near", holds={"dram": {"m"}}, instances=[_running("a", "near", left)]), _gpu("far")]

    soon = choose("serverlessllm", "m", 6 * GB, gpus(10), est)  # 10 tokens x 0.05 s (the prior) = 0.5 s
    assert (soon.kind, soon.gpu, soon.tier) == ("wait", ("near", 0), "dram")
    assert soon.estimate_s == pytest.approx(10 * 0.05 + 0.2)
    late = choose("serverlessllm", "m", 6 * GB, gpus(1000), est)  # 50 s: the load elsewhere is cheaper
    assert (late.kind, late.gpu) == ("load", ("far", 0))
    assert any(c["kind"] == "wait" and c["estimate_s"] > late.estimate_s for c in late.considered)
    # The step time measured on the node replaces the prior: at 10 ms a token, 1000 tokens are 10 s.
    est.observe_step("a", "near", 0.01)
    assert est.step_time("a", "near") == pytest.approx(0.01) and est.step_time("a", "elsewhere") == pytest.approx(0.01)
    measured = choose("serverlessllm", "m", 6 * GB, gpus(1000), est)
    assert (measured.kind, measured.gpu) == ("wait", ("near", 0))
    assert measured.estimate_s == pytest.approx(1000 * 0.01 + 0.2)
    # A request whose budget is unknown counts DEFAULT_REMAINING_TOKENS.
    assert est.busy_s(_running("a", "near", -1), "near") == pytest.approx(DEFAULT_REMAINING_TOKENS * 0.01)


def test_a_wait_never_beats_unloading_idle_instances_of_other_models(est: Estimator) -> None:
    # "busy" holds m in DRAM behind a long decode; "spare" holds m on SSD behind an idle instance of another
    # model: unloading it and loading from SSD (2 s) beats waiting 50 s, as random found in the trace.
    busy = _gpu("busy", holds={"dram": {"m"}}, instances=[_running("a", "busy", 1000)])
    spare = _gpu("spare", holds={"ssd": {"m"}}, instances=[InstanceView("old-1", "old", "ready", [], 8 * GB)])
    d = choose("serverlessllm", "m", 6 * GB, [busy, spare], est)
    assert (d.kind, d.gpu, d.evict) == ("load", ("spare", 0), ["old-1"])
    assert d.estimate_s == pytest.approx(2.0)
    # Repeated, the decision is the same: it does not come back to ``wait`` while that load is cheaper.
    assert choose("serverlessllm", "m", 6 * GB, [busy, spare], est).kind == "load"
    # Nearly done, the busy GPU is worth its wait (0.1 s + 0.2 s from DRAM).
    busy.instances = [_running("a", "busy", 2)]
    assert choose("serverlessllm", "m", 6 * GB, [busy, spare], est).kind == "wait"


def test_requests_with_no_single_destination_split_over_instances_with_free_slots(est: Estimator) -> None:
    # "near" holds m in DRAM and runs three requests of a; no GPU has room for another instance of a, and
    # the two ready instances of a elsewhere have two free slots each: the requests move in parts, no load.
    near = _gpu("near", holds={"dram": {"m"}}, instances=[_running("a", "near", 500, 500, 500)])
    x = _gpu("x", instances=[_running("a", "x", 500, 500)])
    y = _gpu("y", instances=[_running("a", "y", 500, 500)])
    d = choose("serverlessllm", "m", 6 * GB, [near, x, y], est)
    assert (d.kind, d.gpu, d.move) == ("migrate", ("near", 0), [])
    assert d.split == [("a-near", ("x", 0), ("near-r0", "near-r1")), ("a-near", ("y", 0), ("near-r2",))]
    assert d.estimate_s == pytest.approx(est.migration_s("a", 100) + 0.2)
    # Without those slots (a full instance, or one whose slots are unknown) nothing can move: wait.
    x.instances = [_running("a", "x", 500, 500, 500, 500)]
    assert choose("serverlessllm", "m", 6 * GB, [near, x, y], est).kind == "wait"


def test_requests_move_to_a_ready_instance_of_their_model_rather_than_a_new_load(est: Estimator) -> None:
    # "x" runs a with three free slots (no load); "z" has room for a new instance of a, from SSD (3 s).
    near = _gpu("near", holds={"dram": {"m"}}, instances=[_running("a", "near", 500, 500, 500)])
    x = _gpu("x", instances=[_running("a", "x", 500)])
    z = _gpu("z", holds={"ssd": {"a"}})
    d = choose("serverlessllm", "m", 6 * GB, [near, x, z], est)
    assert (d.kind, d.gpu, d.move, d.split) == ("migrate", ("near", 0), [("a-near", ("x", 0))], [])
    assert d.estimate_s == pytest.approx(est.migration_s("a", 100) + 0.2)


def test_on_cpu_devices_a_load_goes_where_no_decode_shares_the_host(est: Estimator) -> None:
    # Node n1 has two devices: gpu 1 decodes, gpu 0 is free; node n2's device is free. Both hold m on SSD.
    def gpus(kind: str) -> list[GpuView]:
        free1, busy1, free2 = _gpu("n1"), _gpu("n1", instances=[_running("a", "n1", 100, memory=10 * GB)]), _gpu("n2")
        busy1.gpu = 1
        for g in (free1, busy1, free2):
            g.holds, g.kind = {"ssd": {"m"}}, kind
        return [free1, busy1, free2]

    # Independent GPUs: a tie, the first wins.
    assert choose("serverlessllm", "m", 4 * GB, gpus("gpu"), est).gpu == ("n1", 0)
    # CPU "GPUs": the load beside n1's decode would share its cores (twice as long); n2 is quiet.
    d = choose("serverlessllm", "m", 4 * GB, gpus("cpu"), est)
    assert d.gpu == ("n2", 0) and d.estimate_s == pytest.approx(2.0)
    n1 = next(c for c in d.considered if c["gpu"] == ("n1", 0))
    assert n1["estimate_s"] == pytest.approx(2.0 * (1 + CPU_CONTENTION))


def test_the_step_time_is_measured_from_the_token_counts_the_router_reports(est: Estimator) -> None:
    clock = FakeClock()
    where = {"r1": ("a-1", "a", "n1"), "r2": ("a-1", "a", "n1")}
    est.observe_tokens({"r1": 100, "r2": 50}, where, clock.now)
    assert est.step_time("a", "n1") == pytest.approx(DEFAULT_STEP_S)  # one report: no rate yet
    est.observe_tokens({"r1": 120, "r2": 50}, where, clock.advance(1.0))  # r2 still in its prefill
    assert est.step_time("a", "n1") == pytest.approx(1.0 / 20)
    # A request that moved between two reports says nothing of either instance; the figure is kept.
    est.observe_tokens({"r1": 121}, {"r1": ("a-2", "a", "n2")}, clock.advance(1.0))
    assert ("a", "n2") not in est.step_s and est.step_time("a", "n1") == pytest.approx(1.0 / 20)
    est.observe_tokens({"r1": 141}, {"r1": ("a-2", "a", "n2")}, clock.advance(2.0))
    assert est.step_time("a", "n2") == pytest.approx(2.0 / 20)


# ------------------------------------------------------------------ a move spends a load of the moved model


def test_a_move_that_saves_less_than_the_reload_it_costs_is_not_taken(est: Estimator) -> None:
    # GPU run 2, seed 2: two bursting models took turns migrating each other's short requests to fresh loads
    # elsewhere, and the requests finished at the source before their moves did. "near" holds m in DRAM
    # (0.2 s) and runs a; "far" has room for a, in its DRAM (0.3 s; its recompute 0.1 s: the move 0.4 s),
    # m only in its repository (20 s).
    def gpus(left: int) -> list[GpuView]:
        near = _gpu("near", holds={"dram": {"m"}}, instances=[_running("a", "near", left)])
        return [near, _gpu("far", holds={"dram": {"a"}})]

    # a's request has 12 tokens left (0.6 s): its move is done sooner (0.4 s), but that saves 0.2 s for a
    # load of a (0.3 s) the cluster would not otherwise make. Waiting for it is the option.
    short = choose("serverlessllm", "m", 6 * GB, gpus(12), est)
    assert (short.kind, short.gpu, short.move) == ("wait", ("near", 0), [])
    assert short.estimate_s == pytest.approx(12 * 0.05 + 0.2)
    # With 40 tokens left (2 s) the move saves 1.6 s for the 0.3 s reload: it is taken, and says what it spends.
    long = choose("serverlessllm", "m", 6 * GB, gpus(40), est)
    assert (long.kind, long.move) == ("migrate", [("a-near", ("far", 0))])
    assert long.estimate_s == pytest.approx(0.3 + est.migration_s("a", 100) + 0.2)
    assert long.reload_s == pytest.approx(0.3)
    assert next(c for c in long.considered if c["kind"] == "migrate")["reload_s"] == pytest.approx(0.3)


def test_of_two_busy_instances_only_the_one_worth_moving_moves_the_other_is_waited_for(est: Estimator) -> None:
    # "near" (7 GB) runs a (1 token left: done in 0.05 s) and b (1,000 left: 50 s), 3 GB each: m needs both
    # gone. "far" has room for both, from DRAM. Moving a would load it elsewhere for nothing: a is drained
    # (takes no new request) and b moves.
    near = _gpu("near", holds={"dram": {"m"}}, memory=7 * GB,
                instances=[_running("a", "near", 1, memory=3 * GB), _running("b", "near", 1000, memory=3 * GB)])
    far = _gpu("far", holds={"dram": {"a", "b"}})
    est.model_bytes["b"] = 6 * GB
    d = choose("serverlessllm", "m", 6 * GB, [near, far], est)
    assert (d.kind, d.gpu, d.move, d.drain) == ("migrate", ("near", 0), [("b-near", ("far", 0))], ["a-near"])
    assert d.estimate_s == pytest.approx(0.3 + est.migration_s("b", 100) + 0.2)
    assert d.reload_s == pytest.approx(0.3)


def test_a_migration_is_weighed_with_the_reload_of_the_moved_model(est: Estimator) -> None:
    # "near" holds m in DRAM and runs a for 50 s more; "far" holds a in DRAM (a move there: 0.4 s, m after it
    # 0.2 s: 0.6 s in all) but m only in the repository; "other" holds m in DRAM behind 0.6 s of queue (0.8 s)
    # and has no room for a. m starts 0.2 s sooner by the move, which spends a 0.3 s load of a: the load on
    # "other" is the option. Behind a longer queue there (1.6 s) the move wins again.
    def gpus(queue: float) -> list[GpuView]:
        near = _gpu("near", holds={"dram": {"m"}}, instances=[_running("a", "near", 1000, memory=7 * GB)])
        other = _gpu("other", holds={"dram": {"m"}}, memory=5 * GB, loading_s=queue)
        return [near, _gpu("far", holds={"dram": {"a"}}), other]

    d = choose("serverlessllm", "m", 4 * GB, gpus(0.6), est)
    assert (d.kind, d.gpu) == ("load", ("other", 0))
    migrate = next(c for c in d.considered if c["kind"] == "migrate")
    assert migrate["estimate_s"] == pytest.approx(0.6) and migrate["reload_s"] == pytest.approx(0.3)
    assert choose("serverlessllm", "m", 4 * GB, gpus(1.4), est).kind == "migrate"


def test_on_cpu_devices_a_move_to_another_device_of_the_node_keeps_its_decode_on_the_host(est: Estimator) -> None:
    # Node n1 has two cpu devices, both holding m and a in DRAM: a decodes on device 0, device 1 is free. Loading m
    # on device 1 shares the host with a's decode: 0.2 s x 2. Moving a to device 1 frees device 0, but a's decode
    # stays on n1's cores: its own load (0.3 s x 2) and recompute (0.1 s), then m's load still shared (0.4 s), not
    # the 0.2 s of a quiet host it was once counted at.
    busy0 = _gpu("n1", holds={"dram": {"m", "a"}}, instances=[_running("a", "n1", 1000)])
    free1 = _gpu("n1", holds={"dram": {"m", "a"}})
    free1.gpu = 1
    for g in (busy0, free1):
        g.kind = "cpu"
    d = choose("serverlessllm", "m", 6 * GB, [busy0, free1], est)
    assert (d.kind, d.gpu) == ("load", ("n1", 1)) and d.estimate_s == pytest.approx(0.2 * (1 + CPU_CONTENTION))
    migrate = next(c for c in d.considered if c["kind"] == "migrate")
    assert migrate["estimate_s"] == pytest.approx((0.3 + 0.2) * (1 + CPU_CONTENTION) + est.migration_s("a", 100))
