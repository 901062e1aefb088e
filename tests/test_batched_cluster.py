"""Batched streams through a real cluster: one request migrated out of a batch of 8, and a node serving 8
batched streams killed with SIGKILL. Every stream completes as one stream (no token lost or repeated) and
equals the same request run alone; the others are unaffected.

The model runs ``deterministic: true`` here, so "equals the same request alone" is exact whatever shared its
batch (the default mode's batched float sums may differ in the last bits; tests/test_batching.py bounds that).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.client import Completion, TokenEvent

from .conftest import RunningCluster

N_STREAMS = 8
MAX_TOKENS = 160
PROMPTS = [f"Story number {i}: once upon a time" for i in range(N_STREAMS)]
SAMPLING = [dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.9, top_p=0.95, seed=100 + i)
            for i in range(N_STREAMS)]
MODEL = {"deterministic": True, "target_concurrency": N_STREAMS}


def _alone(model_dir: Path) -> list[list[int]]:
    """Each request run by itself through the same engine."""
    from sllm_actors.gpu.engine import Engine
    from sllm_actors.gpu.sequence import Sequence
    from sllm_actors.messages import SamplingParams
    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(model_dir, "cpu")
    engine = Engine(model, tokenizer, deterministic=True)
    out = []
    for prompt, kw in zip(PROMPTS, SAMPLING):
        seq = Sequence("ref", engine.tokenize(prompt, chat=False), [],
                       SamplingParams(MAX_TOKENS, kw["temperature"], kw.get("top_p", 1.0), kw.get("seed", 0)))
        engine.add(seq)
        while engine.has_work():
            engine.step_batch()
        out.append(seq.generated_ids)
    return out


def _streams(cluster: RunningCluster, when_all_at: int, action: Any) -> tuple[list[list[int]], list[Completion]]:
    """Run the 8 streams together; once every one has ``when_all_at`` tokens, ``action(request ids)`` runs once."""
    seen: list[list[int]] = [[] for _ in range(N_STREAMS)]
    done: list[Any] = [None] * N_STREAMS
    ids: list[str] = [""] * N_STREAMS
    errors: list[BaseException] = []
    fired = threading.Event()
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            with cluster.client() as client:
                for event in client.generate("slow", PROMPTS[i], max_tokens=MAX_TOKENS, **SAMPLING[i]):
                    if isinstance(event, TokenEvent):
                        assert event.index == len(seen[i]), f"stream {i}: token {event.index} after {len(seen[i])}"
                        seen[i].extend(event.token_ids)
                        ids[i] = event.request_id
                        with lock:
                            ready = all(len(s) >= when_all_at for s in seen) and not fired.is_set()
                            if ready:
                                fired.set()
                        if ready:
                            action(list(ids))
                    else:
                        done[i] = event
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(N_STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert fired.is_set(), "the action never ran: the streams did not all reach the mark together"
    assert all(isinstance(d, Completion) for d in done), done
    return seen, done


def _one_instance_holds_all(cluster: RunningCluster, request_ids: list[str]) -> str:
    with cluster.client() as c:
        status = c.status()
    where = {r["request_id"]: r["node"] for r in status["requests"]}
    nodes = {where.get(rid) for rid in request_ids}
    assert len(nodes) == 1, f"the 8 streams were spread over {nodes}: not one batch"
    return nodes.pop()  # type: ignore[return-value]


@pytest.mark.slow
def test_one_request_migrates_out_of_a_batch_of_8(cluster_factory: Any, slow_model: Path) -> None:
    cluster = cluster_factory({"slow": slow_model}, extra={"models": [{"name": "slow", "source": str(slow_model),
                                                                       **MODEL}],
                                                            "scheduler": {"migration_transfer": "recompute"}})
    expected = _alone(slow_model)
    acks: list[str] = []

    def migrate_one(request_ids: list[str]) -> None:
        node = _one_instance_holds_all(cluster, request_ids)
        with cluster.client() as c:
            acks.append(c.migrate(request_ids[3], "node-2" if node == "node-1" else "node-1"))

    seen, done = _streams(cluster, 15, migrate_one)
    for i in range(N_STREAMS):
        assert seen[i] == done[i].token_ids == expected[i], f"stream {i}"
    assert acks and acks[0].startswith("migrated"), acks
    moved = [m for m in done[3].migrations if m["kind"] == "migration" and m["outcome"] == "done"]
    assert len(moved) == 1 and moved[0]["from"].split("/")[0] != moved[0]["to"].split("/")[0], done[3].migrations
    assert all(not d.migrations for j, d in enumerate(done) if j != 3), "the others stayed where they were"


@pytest.mark.slow
def test_a_node_serving_8_batched_streams_is_killed(cluster_factory: Any, slow_model: Path) -> None:
    cluster = cluster_factory({"slow": slow_model}, extra={"models": [{"name": "slow", "source": str(slow_model),
                                                                       **MODEL}]})
    expected = _alone(slow_model)

    def kill_their_node(request_ids: list[str]) -> None:
        node = _one_instance_holds_all(cluster, request_ids)
        os.kill(cluster.node_pids()[node], signal.SIGKILL)

    seen, done = _streams(cluster, 15, kill_their_node)
    for i in range(N_STREAMS):
        assert seen[i] == done[i].token_ids == expected[i], f"stream {i}"
        assert any(m["kind"] == "resume" for m in done[i].migrations), done[i].migrations
