"""The health core (policy/health.py): circuit breakers, poisoned devices, cordons and suspect models, on an injected
clock."""

from __future__ import annotations

from sllm_actors.policy.health import (
    BACKOFF_MAX_S,
    BACKOFF_S,
    BREAKER_THRESHOLD,
    MODEL_BACKOFF_MAX_S,
    MODEL_BACKOFF_S,
    MODEL_SUSPECT_FAILURES,
    Breaker,
    Health,
    is_poisoned,
)

GPU = ("node-2", 0)
OTHER = ("node-1", 0)


def test_three_failures_in_a_row_open_the_breaker_and_a_success_between_resets_the_count() -> None:
    h = Health()
    assert h.load_failed(GPU, "no such file", 0.0) == "counted"
    assert h.load_failed(GPU, "no such file", 1.0) == "counted"
    h.load_succeeded(GPU)
    assert h.load_failed(GPU, "no such file", 2.0) == "counted"
    assert h.load_failed(GPU, "no such file", 3.0) == "counted"
    assert h.may_load(GPU, 3.0)
    assert h.load_failed(GPU, "no such file", 4.0) == "opened"
    assert not h.may_load(GPU, 4.0)
    assert h.may_serve(GPU), "an open breaker stops loads, not the instances already serving there"
    assert h.may_load(OTHER, 4.0), "a breaker is per GPU"
    assert h.gpu_state(GPU, 4.0) == "breaker open"
    assert "breaker open" in h.why_not(GPU, 4.0) and "no such file" in h.why_not(GPU, 4.0)


def test_half_open_lets_one_trial_load_whose_failure_doubles_the_back_off_up_to_the_cap() -> None:
    h = Health()
    now = 0.0
    for _ in range(BREAKER_THRESHOLD):
        h.load_failed(GPU, "boom", now)
    b = h.breaker(GPU)
    backoff = BACKOFF_S
    for _ in range(12):
        assert b.state(now + backoff - 0.01) == "open"
        now += backoff
        assert b.state(now) == "half_open" and h.may_load(GPU, now)
        h.load_started(GPU, now)
        assert not h.may_load(GPU, now), "one trial at a time"
        assert "trial" in h.why_not(GPU, now)
        assert h.load_failed(GPU, "boom", now) == "opened", "a failed trial opens it again at once"
        backoff = min(BACKOFF_MAX_S, backoff * 2)
        assert b.open_for == backoff
    assert b.open_for == BACKOFF_MAX_S


def test_a_successful_trial_closes_the_breaker_and_the_back_off_starts_over() -> None:
    h = Health()
    for _ in range(BREAKER_THRESHOLD):
        h.load_failed(GPU, "boom", 0.0)
    h.load_started(GPU, BACKOFF_S)
    h.load_succeeded(GPU)
    assert h.gpu_state(GPU, BACKOFF_S) == "healthy" and h.may_load(GPU, BACKOFF_S)
    for _ in range(BREAKER_THRESHOLD):
        h.load_failed(GPU, "boom", 10.0)
    assert h.breaker(GPU).open_for == BACKOFF_S


def test_a_trial_load_that_ends_without_a_verdict_frees_the_trial() -> None:
    h = Health()
    for _ in range(BREAKER_THRESHOLD):
        h.load_failed(GPU, "boom", 0.0)
    h.load_started(GPU, BACKOFF_S)
    assert not h.may_load(GPU, BACKOFF_S)
    h.load_abandoned(GPU)  # its node was lost while it loaded
    assert h.may_load(GPU, BACKOFF_S) and h.gpu_state(GPU, BACKOFF_S) == "breaker half-open"


def test_a_failure_while_open_does_not_trip_it_again() -> None:
    b = Breaker()
    for _ in range(BREAKER_THRESHOLD):
        b.failed(0.0, "boom")
    assert not b.failed(1.0, "a load that started before it opened")
    assert b.open_for == BACKOFF_S and b.trips == 1


def test_a_poisoned_device_is_unhealthy_at_once_until_its_node_restarts() -> None:
    h = Health()
    error = "CUDA error: operation not permitted when stream is capturing"
    assert h.load_failed(GPU, error, 0.0) == "poisoned"
    assert not h.may_serve(GPU) and not h.may_load(GPU, 1000.0)
    assert h.gpu_state(GPU, 0.0) == "unhealthy" and "stream is capturing" in h.why_not(GPU, 0.0)
    h.node_restarted("node-2")
    assert h.may_serve(GPU)
    assert not h.may_load(GPU, 1.0), "the breaker still holds it until its back-off passes"
    assert h.may_load(GPU, BACKOFF_S), "then the first load is a trial"


def test_instance_crashes_count_only_when_they_poison_the_device() -> None:
    h = Health()
    assert not h.instance_crashed(GPU, "crashed: ValueError: bad request", 0.0)
    assert h.may_load(GPU, 0.0) and h.breaker(GPU).failures == 0
    assert h.instance_crashed(GPU, "crashed: RuntimeError: Offset increment outside graph capture encountered "
                                   "unexpectedly.", 0.0)
    assert not h.may_serve(GPU)


def test_poison_markers() -> None:
    assert is_poisoned("loading bench failed: Offset increment outside graph capture encountered unexpectedly.")
    assert is_poisoned("CUDA error: an illegal memory access was encountered")
    assert not is_poisoned("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not is_poisoned("injected load failure (SLLM_FAULT_LOAD_FAIL)")


def test_cordon_drain_uncordon_and_reset() -> None:
    h = Health()
    h.cordon("node-2", "operator")
    assert not h.may_serve(GPU) and not h.may_load(GPU, 0.0) and h.may_serve(OTHER)
    assert h.gpu_state(GPU, 0.0) == "cordoned"
    h.cordon("node-2", "operator", drain=True)
    assert h.gpu_state(GPU, 0.0) == "draining"
    h.drained("node-2")
    assert h.gpu_state(GPU, 0.0) == "cordoned", "a drained node stays cordoned"
    assert h.uncordon("node-2") and not h.uncordon("node-2")
    assert h.may_load(GPU, 0.0)
    for _ in range(BREAKER_THRESHOLD):
        h.load_failed(GPU, "boom", 0.0)
    h.poison(("node-2", 1), "device-side assert triggered", 0.0)
    assert h.reset("node-1") == []
    assert h.reset("node-2", 1) == [("node-2", 1)]
    assert not h.may_load(GPU, 0.0)
    assert h.reset("node-2") == [GPU]
    assert h.may_load(GPU, 0.0) and h.may_load(("node-2", 1), 0.0)


def test_report_names_each_gpu_state_and_reason() -> None:
    h = Health()
    for _ in range(BREAKER_THRESHOLD):
        h.load_failed(GPU, "injected", 0.0)
    h.cordon("node-3", "maintenance")
    report = h.report([OTHER, GPU, ("node-3", 0)], 1.0)
    by = {(g["node"], g["gpu"]): g for g in report["gpus"]}
    assert by[OTHER]["state"] == "healthy" and by[OTHER]["reason"] == ""
    assert by[GPU]["state"] == "breaker open" and by[GPU]["failures"] == 3 and by[GPU]["retry_in_s"] == 4.0
    assert "injected" in by[GPU]["reason"]
    assert by[("node-3", 0)]["state"] == "cordoned"
    assert report["nodes"] == {"node-3": {"state": "cordoned", "reason": "maintenance"}}


# ------------------------------------------------------------------ a model that fails everywhere


def test_a_model_failing_on_two_gpus_is_the_suspect_and_the_gpus_are_acquitted() -> None:
    h = Health()
    # Three failures on node-2 open its breaker (one GPU alone: the fault may be that GPU's)...
    for t in range(BREAKER_THRESHOLD):
        assert h.load_failed(GPU, "bad shape", float(t), "m") in ("counted", "opened")
    assert h.breaker(GPU).tripped and h.model_may_load("m", 3.0)
    # ...and a failure on node-1 too: the model is the suspect. node-2's breaker held only its failures: closed.
    assert h.load_failed(OTHER, "bad shape", 3.0, "m") == "suspect"
    assert h.acquitted == [GPU]
    assert h.may_load(GPU, 3.0) and h.may_load(OTHER, 3.0), "the GPUs stay in service for other models"
    assert h.breaker(OTHER).failures == 0, "the suspect's failure was not charged to node-1"
    assert not h.model_may_load("m", 3.0) and h.model_may_load("other", 3.0)
    held = h.model_held("m", 3.0)
    assert "model m" in held and "node-1/gpu-0: bad shape" in held and "node-2/gpu-0: bad shape" in held, held
    report = h.report([GPU, OTHER], 3.0)
    assert report["models"]["m"]["state"] == "held" and report["models"]["m"]["gpus"] == ["node-1/gpu-0",
                                                                                          "node-2/gpu-0"]
    assert [g["state"] for g in report["gpus"]] == ["healthy", "healthy"]


def test_a_gpu_that_failed_other_models_too_keeps_its_breaker() -> None:
    h = Health()
    h.load_failed(GPU, "no memory", 0.0, "a")
    h.load_failed(GPU, "bad shape", 1.0, "m")
    h.load_failed(GPU, "bad shape", 2.0, "m")
    assert h.breaker(GPU).tripped
    assert h.load_failed(OTHER, "bad shape", 3.0, "m") == "suspect"
    assert h.acquitted == [], "node-2 failed model a as well: still its own breaker's business"
    assert h.breaker(GPU).tripped and h.breaker(GPU).failures == 1 and h.breaker(GPU).models == {"a": 1}


def test_one_failure_on_each_of_two_gpus_is_not_yet_a_suspect_and_a_success_anywhere_clears_the_record() -> None:
    h = Health()
    assert h.load_failed(GPU, "memory briefly short", 0.0, "m") == "counted"
    assert h.load_failed(OTHER, "memory briefly short", 1.0, "m") == "counted"
    assert h.model_may_load("m", 1.0) and MODEL_SUSPECT_FAILURES > 2
    h.load_succeeded(OTHER, "m")
    assert "m" not in h.models
    # Failing on one GPU only, however often, is that GPU's breaker's business.
    for t in range(10):
        assert h.load_failed(GPU, "broken", 10.0 + t * 1000, "m") != "suspect"
    assert h.model_may_load("m", 20_000.0)


def test_a_suspect_models_trial_its_failure_doubles_the_hold_and_its_success_clears_it() -> None:
    h = Health()
    for key, t in ((GPU, 0.0), (OTHER, 1.0), (GPU, 2.0)):
        h.load_failed(key, "bad", t, "m")
    assert not h.model_may_load("m", 2.0)
    record = h.models["m"]
    now = 2.0 + MODEL_BACKOFF_S
    assert record.breaker.state(now) == "half_open" and h.model_may_load("m", now)
    h.load_started(OTHER, now, "m")
    assert not h.model_may_load("m", now) and "trial" in h.model_held("m", now)
    assert h.load_failed(OTHER, "bad", now, "m") == "held", "a failed trial is the model's, not node-1's"
    assert h.breaker(OTHER).failures == 0
    assert record.breaker.open_for == 2 * MODEL_BACKOFF_S
    # A load that started before the hold and fails during it does not lengthen it.
    assert h.load_failed(GPU, "bad", now + 1, "m") == "held" and record.breaker.open_for == 2 * MODEL_BACKOFF_S
    for _ in range(10):
        now += record.breaker.open_for
        h.load_started(GPU, now, "m")
        h.load_failed(GPU, "bad", now, "m")
    assert record.breaker.open_for == MODEL_BACKOFF_MAX_S
    now += MODEL_BACKOFF_MAX_S
    h.load_started(GPU, now, "m")
    h.load_abandoned(GPU, "m")
    assert h.model_may_load("m", now), "a trial that ended without a verdict frees the trial"
    h.load_started(GPU, now, "m")
    h.load_succeeded(GPU, "m")
    assert h.model_may_load("m", now) and h.model_held("m", now) == "" and h.report([], now)["models"] == {}


def test_a_poisoned_device_is_the_devices_fault_whatever_the_model() -> None:
    h = Health()
    assert h.load_failed(GPU, "CUDA error: an illegal memory access was encountered", 0.0, "m") == "poisoned"
    assert h.load_failed(OTHER, "CUDA error: an illegal memory access was encountered", 0.0, "m") == "poisoned"
    assert "m" not in h.models and h.model_may_load("m", 0.0)


# ------------------------------------------------------------------ where the health shows (no cluster needed)

SICK_STATUS = {
    "nodes": [{"name": "node-1", "pid": 11, "alive": True, "ready": True, "restarts": 0, "cordoned": ""},
              {"name": "node-2", "pid": 12, "alive": True, "ready": True, "restarts": 1, "cordoned": "draining"}],
    "gpus": [{"node": "node-1", "index": 0, "device": "cpu", "memory_total": 1 << 30, "memory_used": 0, "models": [],
              "health": "breaker open", "health_reason": "breaker open for 5s more: injected load failure",
              "breaker_failures": 3},
             {"node": "node-2", "index": 0, "device": "cpu", "memory_total": 1 << 30, "memory_used": 0, "models": [],
              "health": "draining", "health_reason": "node-2 draining: drained by an operator", "breaker_failures": 0}],
    "instances": [], "requests": [], "tiers": [], "queue": [], "migrations": [],
    "models": [{"name": "bad", "source": "/m/bad", "health": "held", "health_reason": "model bad is failing to load"},
               {"name": "good", "source": "/m/good", "health": "healthy", "health_reason": ""}],
}


def test_the_tui_shows_breakers_and_cordons_and_does_not_migrate_onto_them() -> None:
    from sllm_actors.tui.view import EventMemory, pick_migration_target, resource_rows, tree_lines

    labels = [label.plain for _, _, label, _ in tree_lines(SICK_STATUS, EventMemory())]
    assert any(label.startswith("gpu-0 (cpu) idle breaker open") for label in labels), labels
    assert any(label.startswith("node-2 ") and "draining" in label for label in labels), labels
    cells = dict(resource_rows(SICK_STATUS))
    last = cells["gpu:node-1/gpu-0"][-1]
    assert "breaker open" in getattr(last, "plain", last) and "injected load failure" in getattr(last, "plain", last)
    request = {"request_id": "r1", "node": "node-2"}
    assert pick_migration_target(request, SICK_STATUS) is None, "node-1's GPU takes no loads: no target"


def test_metrics_carry_each_gpus_health_with_its_reason() -> None:
    from sllm_actors.http.metrics import Metrics

    text = Metrics(lambda: SICK_STATUS).render().decode()
    assert ('sllm_gpu_health{gpu="0",node="node-1",reason="breaker open for 5s more: injected load failure",'
            'state="breaker open"} 1.0') in text
    assert 'sllm_gpu_load_failures{gpu="0",node="node-1"} 3.0' in text
    assert 'sllm_node_cordoned{node="node-2"} 1.0' in text and 'sllm_node_cordoned{node="node-1"} 0.0' in text
    assert 'sllm_model_load_held{model="bad",state="held"} 1.0' in text
    assert 'sllm_model_load_held{model="good",state="healthy"} 0.0' in text


# ------------------------------------------------------------------ the placement steps' hooks (policy/steps.py)


def test_closed_gpus_take_no_requests_and_no_loads_gpus_only_serve() -> None:
    from .test_placement_steps import make, ready_instance, run

    core = make()
    on_n1 = ready_instance(core, "a", "n1")
    on_n2 = ready_instance(core, "a", "n2", "r0")
    core.closed = {("n1", 0)}  # n1 cordoned: its idle instance takes nothing, though it has the most room
    assert [a.instance for a in run(core.place("r1", "a", 1.0)) if hasattr(a, "instance")] == [on_n2]
    core.closed, core.no_loads = set(), {("n1", 0)}  # n1's breaker open: its ready instance still serves
    assert [a.instance for a in run(core.place("r2", "a", 2.0)) if hasattr(a, "instance")] == [on_n1]
    # A migration's destination is never a GPU that may not load, nor an instance on a closed one.
    core.no_loads = {("n1", 0)}
    on_n1.requests.update({"x1": None, "x2": None})  # full
    assert run(core.migrate(["r0"], on_n2, ("n1", None), "test", 3.0)) == []
    core.no_loads, core.closed = set(), {("n1", 0)}
    on_n1.requests.clear()
    assert run(core.migrate(["r0"], on_n2, ("n1", None), "test", 3.0)) == []


def test_a_checkpoints_own_fault_is_no_sign_of_a_sick_gpu() -> None:
    from sllm_actors.actors.node.storage_client import is_checkpoint_fault
    from sllm_actors.storage import CheckpointError, FetchError

    assert is_checkpoint_fault(CheckpointError("data_0.bin: checksum mismatch in bytes [0, 8)"))
    assert is_checkpoint_fault(FetchError("refused the request (HTTP 401)", url="http://repo/tiny/data_0.bin"))
    assert is_checkpoint_fault(FileNotFoundError("tiny/tensor_index.json"))
    assert not is_checkpoint_fault(RuntimeError("CUDA error: operation not permitted when stream is capturing"))
    assert not is_checkpoint_fault(RuntimeError("injected load failure (SLLM_FAULT_LOAD_FAIL)"))
