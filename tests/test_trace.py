"""Per-hop request traces (``SLLM_TRACE``): every hop of a request's way to its first token is marked, once the
cluster's processes inherit the variable, and in the order the request passes them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sllm_actors.client import Completion
from sllm_actors.runtime import trace

N_REQUESTS = 3


def test_every_hop_is_marked_in_order(cluster_factory: Any, tiny_model: Path, tmp_path: Path) -> None:
    trace_dir = tmp_path / "trace"
    cluster = cluster_factory({"tiny": tiny_model}, env={trace.ENV: str(trace_dir)})
    done: list[Completion] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with cluster.client() as client:
                for event in client.generate("tiny", f"trace me {i}", max_tokens=4, request_id=f"tr-{i}"):
                    if isinstance(event, Completion):
                        done.append(event)
        except BaseException as exc:  # re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N_REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(done) == N_REQUESTS
    hops = trace.read(trace_dir, prefix="tr-")
    # The client's own hops are the benchmark's to mark; every hop in between is the cluster's.
    inside = [h for h in trace.HOPS if not h.startswith("client_")]
    assert sorted(hops) == [f"tr-{i}" for i in range(N_REQUESTS)]
    for request_id, marked in hops.items():
        assert [h for h in inside if h in marked] == inside, (request_id, marked)
        times = [marked[h] for h in inside]
        assert times == sorted(times), (request_id, marked)
