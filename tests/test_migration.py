"""Live migration through the real protocol, between real node processes."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.client import Completion, RequestError, TokenEvent

from .conftest import RunningCluster

PROMPT = "Once upon a time there was a small model"
RECOMPUTE = {"migration_transfer": "recompute"}
"""These tests exercise the token protocol; tests/test_kv_copy.py the KV copy."""


def _reference(model_dir: Path, n: int, *, temperature: float = 0.0, seed: int = 0) -> list[int]:
    from sllm_actors.gpu.engine import Engine
    from sllm_actors.gpu.sequence import Sequence
    from sllm_actors.messages import SamplingParams
    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(model_dir, "cpu")
    engine = Engine(model, tokenizer)
    seq = Sequence("ref", engine.tokenize(PROMPT, chat=False), [], SamplingParams(n, temperature, 0.95, seed))
    engine.prefill(seq)
    while not seq.finish_reason:
        engine.step(seq)
    return seq.generated_ids


@pytest.fixture(scope="module")
def cluster(slow_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One cluster for the non-destructive tests, with an instance already loaded on each node, so a
    migration's destination is ready and the test measures the protocol rather than a cold start."""
    from .conftest import start_cluster, stop_cluster, write_topology

    topo = write_topology(tmp_path_factory.mktemp("migration") / "topology.yaml", {"slow": slow_model},
                          extra={"scheduler": RECOMPUTE})
    running = start_cluster(topo)
    try:
        _instance_on_both_nodes(running)
        yield running
    finally:
        stop_cluster(running)


def _instance_on_both_nodes(cluster: RunningCluster) -> None:
    """Load ``slow`` on both nodes (a short request migrated across), so later migrations find their
    destination ready."""
    _generate_with_action(cluster, 3, _migrate_to_other_node(cluster, []), max_tokens=300)
    cluster.wait_for(lambda st: len({i["node"] for i in st["instances"] if i["state"] == "ready"}) == 2, 60,
                     "an instance of slow on both nodes")


def _generate_with_action(cluster: RunningCluster, at_tokens: int, action: Any, **kwargs: Any) -> tuple[list[int], Completion]:
    seen: list[int] = []
    done: Completion | None = None
    errors: list[BaseException] = []
    worker: threading.Thread | None = None

    def run_action(request_id: str) -> None:
        try:
            action(request_id)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    with cluster.client() as client:
        for event in client.generate("slow", PROMPT, **kwargs):
            if isinstance(event, TokenEvent):
                seen.extend(event.token_ids)
                if len(seen) >= at_tokens and worker is None:
                    worker = threading.Thread(target=run_action, args=(event.request_id,), daemon=True)
                    worker.start()
            else:
                assert isinstance(event, Completion)
                done = event
    assert worker is not None
    worker.join(60)
    assert not errors, errors
    assert done is not None
    return seen, done


def _migrate_to_other_node(cluster: RunningCluster, results: list[str]) -> Any:
    def action(request_id: str) -> None:
        with cluster.client() as c:
            where = next(r["node"] for r in c.status()["requests"] if r["request_id"] == request_id)
            target = "node-2" if where == "node-1" else "node-1"
            results.append(c.migrate(request_id, target))
    return action


@pytest.mark.parametrize("at_tokens", [3, 40])
def test_greedy_output_is_unchanged_by_a_migration(cluster: RunningCluster, slow_model: Path, at_tokens: int) -> None:
    n = 400
    expected = _reference(slow_model, n)
    acks: list[str] = []
    seen, done = _generate_with_action(cluster, at_tokens, _migrate_to_other_node(cluster, acks), max_tokens=n)
    assert seen == expected and done.token_ids == expected
    assert acks and acks[0].startswith("migrated"), acks
    migrations = [m for m in done.migrations if m["kind"] == "migration" and m["outcome"] == "done"]
    assert len(migrations) == 1, json.dumps(done.migrations)
    m = migrations[0]
    assert m["from"].split("/")[0] != m["to"].split("/")[0]
    assert m["rounds"] >= 1 and m["tokens_recomputed"] >= at_tokens and m["total_s"] > 0 and m["pause_s"] > 0
    assert m["transfer"] == "recompute" and m["kv_bytes"] == 0


def test_seeded_sampling_continues_exactly_after_a_migration(cluster: RunningCluster, slow_model: Path) -> None:
    n = 400
    expected = _reference(slow_model, n, temperature=0.9, seed=1234)
    acks: list[str] = []
    seen, done = _generate_with_action(cluster, 25, _migrate_to_other_node(cluster, acks), max_tokens=n,
                                       temperature=0.9, top_p=0.95, seed=1234)
    assert seen == expected
    assert acks and acks[0].startswith("migrated")


def test_long_context_migrates_in_several_rounds(cluster_factory: Any, slow_model: Path) -> None:
    cluster = cluster_factory({"slow": slow_model},
                              extra={"scheduler": {"migration_delta_tokens": 2, "migration_max_rounds": 3, **RECOMPUTE}})
    # A cold destination could take longer to load than the request has left to run, and the migration
    # would end "finished first" with no round at all.
    _instance_on_both_nodes(cluster)
    n = 900
    expected = _reference(slow_model, n)
    acks: list[str] = []
    at = min(600, len(expected) - 100)
    assert at > 200, f"the random model stopped at {len(expected)} tokens; pick another seed"
    seen, done = _generate_with_action(cluster, at, _migrate_to_other_node(cluster, acks), max_tokens=n)
    assert seen == expected
    m = next(m for m in done.migrations if m["kind"] == "migration")
    assert m["rounds"] >= 2, json.dumps(m)


def test_migrating_an_unknown_request_is_refused(cluster: RunningCluster) -> None:
    with cluster.client() as c:
        with pytest.raises(RequestError, match="not a running request nor an instance"):
            c.migrate("no-such-request", "node-2")


def test_destination_killed_during_resume_aborts_and_source_goes_on(cluster_factory: Any, slow_model: Path) -> None:
    cluster = cluster_factory({"slow": slow_model}, extra={"scheduler": RECOMPUTE})
    n = 300
    expected = _reference(slow_model, n)
    outcome: list[str] = []

    def action(request_id: str) -> None:
        with cluster.client() as c:
            pids = c.status()["nodes"]
            where = next(r["node"] for r in c.status()["requests"] if r["request_id"] == request_id)
            target = "node-2" if where == "node-1" else "node-1"
            target_pid = next(n["pid"] for n in pids if n["name"] == target)
            os.kill(target_pid, signal.SIGKILL)
            try:
                outcome.append(c.migrate(request_id, target))
            except RequestError as exc:
                outcome.append(f"refused: {exc.code}")

    seen, done = _generate_with_action(cluster, 30, action, max_tokens=n)
    assert seen == expected, "the source kept generating; nothing lost or repeated"
    assert outcome


def _three_streams_migrated_together(cluster: Any, model_path: Path, n: int = 300) -> list[Any]:
    """Three greedy streams on one instance, that instance migrated by hand once all three have tokens.

    Checks that every stream equals the undisturbed run and returns the three Completions.
    """
    expected = _reference(model_path, n)
    results: dict[int, Any] = {}
    started = threading.Barrier(4)

    def one(i: int) -> None:
        with cluster.client() as client:
            got: list[int] = []
            stream = client.generate("slow", PROMPT, max_tokens=n, request_id=f"many-{i}")
            for event in stream:
                if isinstance(event, TokenEvent):
                    got.extend(event.token_ids)
                    if len(got) == 5:
                        started.wait(30)
                else:
                    results[i] = (got, event)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    started.wait(60)
    with cluster.client() as c:
        st = c.status()
        placed = {r["instance_id"] for r in st["requests"] if r["request_id"].startswith("many-")}
        assert len(placed) == 1, st["requests"]
        (instance_id,) = placed
        node = next(i["node"] for i in st["instances"] if i["instance_id"] == instance_id)
        ack = c.migrate(instance_id, "node-2" if node == "node-1" else "node-1")
    for t in threads:
        t.join(120)
    assert ack.startswith("migrated many-0, many-1, many-2"), ack
    for i in range(3):
        got, done = results[i]
        assert got == expected and done.token_ids == expected
    return [results[i][1] for i in range(3)]


def test_every_request_of_an_instance_migrates(cluster_factory: Any, slow_model: Path) -> None:
    cluster = cluster_factory({"slow": slow_model}, extra={"scheduler": RECOMPUTE})  # fresh: one instance for all
    for done in _three_streams_migrated_together(cluster, slow_model):
        assert [m["outcome"] for m in done.migrations if m["kind"] == "migration"] == ["done"], done.migrations


def test_source_killed_mid_migration_resumes_from_the_token_log(cluster_factory: Any, slow_model: Path) -> None:
    cluster = cluster_factory({"slow": slow_model},
                              extra={"scheduler": {"migration_delta_tokens": 1, "migration_max_rounds": 50, **RECOMPUTE}})
    n = 600
    expected = _reference(slow_model, n)

    def action(request_id: str) -> None:
        with cluster.client() as c:
            st = c.status()
            where = next(r["node"] for r in st["requests"] if r["request_id"] == request_id)
            source_pid = next(nd["pid"] for nd in st["nodes"] if nd["name"] == where)
            target = "node-2" if where == "node-1" else "node-1"
            order = threading.Thread(target=lambda: _quietly(c.migrate, request_id, target), daemon=True)
            order.start()
            # Many one-token rounds keep the migration open; kill the source while rounds run.
            cluster.wait_for(lambda s: any(m["state"] == "running" for m in s.get("migrations", [])), 60,
                             "the migration to reach its rounds")
            os.kill(source_pid, signal.SIGKILL)
            order.join(60)

    seen, done = _generate_with_action(cluster, 40, action, max_tokens=n)
    assert seen == expected, "the router resumed from its log: no token lost or repeated"
    assert any(m["kind"] == "resume" for m in done.migrations), done.migrations


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except RequestError:
        pass  # the order fails with its source; the request itself must not
