"""A node that cannot serve leaves the pool (issue 21): load breakers, poisoned devices, cordon and drain, in a
real cluster of two node processes. node-2's loads are made to fail in its real load path (actors/node/faults.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.client import Completion, RequestError, TokenEvent

from .conftest import REPO, RunningCluster

PROMPT = "Once upon a time there was a small model"


def _models(name: str, path: Path, **spec: Any) -> list[dict[str, Any]]:
    return [{"name": name, "source": str(path), "keep_alive": "5m", **spec}]


def _when(cond: Any) -> Any:
    """A ``wait_for`` predicate that returns the status itself once ``cond(status)`` holds."""
    return lambda st: st if cond(st) else None


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return str(reply.read().decode())


def _gpu(st: dict[str, Any], node: str) -> dict[str, Any]:
    return next(g for g in st["gpus"] if g["node"] == node)


def _complete_all(cluster: RunningCluster, model: str, n: int, max_tokens: int = 8) -> list[Completion | BaseException]:
    """``n`` concurrent greedy requests; each one's Completion or the error it got."""
    results: list[Completion | BaseException] = [RuntimeError("no answer")] * n

    def one(i: int) -> None:
        try:
            with cluster.client() as c:
                results[i] = c.complete(model, PROMPT, max_tokens=max_tokens, temperature=0)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertion
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def _http_all(base: str, n: int, max_tokens: int = 8) -> list[tuple[int, str]]:
    """``n`` concurrent greedy completions over HTTP: each one's status code and text (or error body)."""
    results: list[tuple[int, str]] = [(0, "no answer")] * n
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()

    def one(i: int) -> None:
        request = urllib.request.Request(f"{base}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=180) as reply:
                results[i] = (reply.status, json.loads(reply.read())["choices"][0]["text"])
        except urllib.error.HTTPError as exc:
            results[i] = (exc.code, exc.read().decode(errors="replace"))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    return results


def test_failing_loads_open_the_breaker_and_no_request_fails_while_healthy_capacity_exists(
        cluster_factory: Any, tiny_model: Path) -> None:
    from .test_http import free_port, http_endpoint

    cluster = cluster_factory({}, env={"SLLM_FAULT_LOAD_FAIL": "node-2=*"},
                              extra={"models": _models("tiny", tiny_model, target_concurrency=1, max_instances=2),
                                     "scheduler": {"queue_timeout": "60s"}, "controller": {"http_port": free_port()}})
    base = http_endpoint(cluster)
    with cluster.client() as c:
        # node-1 cordoned: the first request can only load on node-2, whose loads fail.
        assert "cordoned node-1" in c.cordon("node-1")
    done: list[Completion | BaseException] = []
    first = threading.Thread(target=lambda: done.extend(_complete_all(cluster, "tiny", 1)), daemon=True)
    first.start()
    st = cluster.wait_for(_when(lambda st: _gpu(st, "node-2")["breaker_failures"] >= 3 and st["queue"]), 60,
                          "node-2's breaker to open with the request queued, not failed")
    gpu2 = _gpu(st, "node-2")
    assert gpu2["health"] in ("breaker open", "breaker half-open"), gpu2
    assert not any(i["node"] == "node-2" and i["state"] == "ready" for i in st["instances"])
    events = [e["text"] for e in st["events"]]
    assert any("node-2/gpu-0: breaker open" in t and "injected load failure" in t for t in events), events
    assert st["nodes"][0]["cordoned"] == "cordoned"
    with cluster.client() as c:
        c.uncordon("node-1")
    first.join(120)
    assert len(done) == 1 and isinstance(done[0], Completion), done
    # More at once than one instance takes, over HTTP: the scale-out cannot land on node-2 while its breaker is
    # open, and a half-open trial there that fails puts its waiters back: all complete on node-1, none a 503.
    answers = _http_all(base, 6)
    assert [code for code, _ in answers] == [200] * 6, answers
    assert {text for _, text in answers} == {done[0].text}, "greedy: one answer"
    # The front end reads the snapshot the controller publishes every 0.5 s: under load the one it holds can
    # still be from before the uncordon, so wait for one that shows both facts rather than for any change.
    healthy_node_1 = 'sllm_gpu_health{gpu="0",node="node-1",reason="",state="healthy"} 1.0'
    node_2_failures = re.compile(r'sllm_gpu_load_failures\{gpu="0",node="node-2"\} ([3-9]|\d\d+)\.0')
    deadline = time.monotonic() + 30
    while not (healthy_node_1 in (metrics := _get(f"{base}/metrics")) and node_2_failures.search(metrics)):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.2)
    st = cluster.wait_for(_when(lambda st: not st["queue"]), 30, "an empty queue")
    # (A half-open trial may be loading on node-2 at this moment; it fails, as every load there does.)
    assert all(i["node"] == "node-1" for i in st["instances"] if i["state"] == "ready"), st["instances"]
    # The operator clears it: node-2 takes loads again (and fails again, its fault being still injected).
    with cluster.client() as c:
        assert "reset node-2/gpu-0" in c.breaker_reset("node-2")
        assert _gpu(c.status(), "node-2")["health"] == "healthy"
        assert "no open breaker" in c.breaker_reset("node-2/gpu-0")


def test_a_poisoned_device_restarts_its_node_and_the_request_is_served_elsewhere(
        cluster_factory: Any, tiny_model: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, env={"SLLM_FAULT_LOAD_POISON": "node-2=*"})
    with cluster.client() as c:
        c.cordon("node-1")
        pid2 = {n["name"]: n["pid"] for n in c.status()["nodes"]}["node-2"]
    done: list[Completion | BaseException] = []
    first = threading.Thread(target=lambda: done.extend(_complete_all(cluster, "tiny", 1)), daemon=True)
    first.start()
    st = cluster.wait_for(_when(
        lambda st: any("device context poisoned" in e["text"] for e in st["events"])
        and next(n for n in st["nodes"] if n["name"] == "node-2")["restarts"] >= 1), 60,
        "node-2 restarted for its poisoned device")
    assert any("stream is capturing" in e["text"] and "unhealthy" in e["text"] for e in st["events"])
    cluster.wait_for(lambda st: next(n for n in st["nodes"] if n["name"] == "node-2")["pid"] not in (0, pid2)
                     and next(n for n in st["nodes"] if n["name"] == "node-2")["alive"], 60,
                     "a new node-2 process")
    with cluster.client() as c:
        c.uncordon("node-1")
    first.join(120)
    assert len(done) == 1 and isinstance(done[0], Completion), done


def test_cordon_keeps_new_work_off_and_drain_moves_a_running_request_then_unloads(
        cluster_factory: Any, slow_model: Path) -> None:
    cluster = cluster_factory({"slow": slow_model}, extra={"scheduler": {"migration_transfer": "recompute"}})
    with cluster.client() as c:
        c.cordon("node-1")
    # Running on node-2 (node-1 is cordoned), long enough to be moved mid-stream.
    seen: list[int] = []
    done: list[Completion] = []

    def stream() -> None:
        with cluster.client() as c:
            for event in c.generate("slow", PROMPT, max_tokens=400, temperature=0):
                if isinstance(event, TokenEvent):
                    seen.extend(event.token_ids)
                elif isinstance(event, Completion):
                    done.append(event)

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    st = cluster.wait_for(_when(lambda st: any(r["tokens"] > 5 for r in st["requests"])), 120, "the stream under way")
    assert [r["node"] for r in st["requests"]] == ["node-2"]
    with cluster.client() as c:
        c.uncordon("node-1")
        assert "draining node-2" in c.drain("node-2")
    st = cluster.wait_for(_when(lambda st: next(n for n in st["nodes"] if n["name"] == "node-2")["cordoned"] == "cordoned"
                          and not any(i["node"] == "node-2" for i in st["instances"])), 180,
                          "node-2 drained: no instance left, still cordoned")
    worker.join(120)
    assert done and done[0].token_ids == seen
    assert [m["to"].split("/")[0] for m in done[0].migrations] == ["node-1"], done[0].migrations
    assert any("node-2 drained" in e["text"] for e in st["events"])
    assert _gpu(st, "node-2")["health"] == "cordoned"
    with cluster.client() as c:
        # A new request goes to node-1 and is token-identical to the one that moved mid-stream.
        again = c.complete("slow", PROMPT, max_tokens=400, temperature=0)
        assert again.token_ids == done[0].token_ids
        assert all(i["node"] == "node-1" for i in c.status()["instances"])
        with pytest.raises(RequestError) as info:
            c.drain("node-9")
        assert info.value.code == "unknown_node" and "node-1, node-2" in info.value.message
        with pytest.raises(RequestError) as info:
            c.cordon("node-1/gpu-0")
        assert info.value.code == "bad_target"
    run = subprocess.run([sys.executable, str(REPO / "cli.py"), "cordon", "node-9", "--cluster", cluster.endpoint],
                         check=False, capture_output=True, text=True, timeout=60, cwd=cluster.topology.parent,
                         env={**os.environ, "SLLM_HOME": str(cluster.topology.parent / "home")})
    assert run.returncode == 1 and "no node 'node-9'" in run.stderr, run.stderr


def test_a_model_failing_on_every_gpu_is_the_suspect_and_its_requests_get_an_error_naming_it(
        cluster_factory: Any, tiny_model: Path, tiny_model_b: Path) -> None:
    # "bad" fails to load on every node (not a checkpoint fault: its file is fine), "good" loads anywhere.
    cluster = cluster_factory({"bad": tiny_model, "good": tiny_model_b}, env={"SLLM_FAULT_LOAD_FAIL": "bad"},
                              extra={"scheduler": {"queue_timeout": "120s"}})
    with cluster.client() as c, pytest.raises(RequestError) as info:
        c.complete("bad", PROMPT, max_tokens=4, temperature=0)
    # Placed again after each failure, on node-1 and node-2, until the pattern says the model is at fault: its
    # request fails then (not after the 120 s queue timeout), with an error naming the model and both GPUs.
    assert info.value.code == "load_failed", info.value
    message = info.value.message
    assert "model bad is failing to load everywhere" in message, message
    assert "node-1/gpu-0: injected load failure" in message and "node-2/gpu-0: injected load failure" in message
    with cluster.client() as c:
        st = c.status()
    # The GPUs are not blamed: no breaker open, no failure held against them, and the model says why it is held.
    assert [(g["node"], g["health"], g["breaker_failures"]) for g in st["gpus"]] == [
        ("node-1", "healthy", 0), ("node-2", "healthy", 0)], st["gpus"]
    bad = next(m for m in st["models"] if m["name"] == "bad")
    assert bad["health"] == "held" and "failing to load everywhere" in bad["health_reason"], bad
    assert any("model bad is failing to load everywhere" in e["text"] for e in st["events"]), st["events"]
    failed_loads = sum(1 for e in st["events"] if e["text"].startswith("loading bad on"))
    with cluster.client() as c:
        # Another model still loads and serves on those GPUs.
        assert c.complete("good", PROMPT, max_tokens=4, temperature=0).finish_reason == "length"
        # The next request for the held model fails at once, with no load tried.
        with pytest.raises(RequestError) as again:
            c.complete("bad", PROMPT, max_tokens=4, temperature=0)
        assert again.value.code == "load_failed" and "model bad" in again.value.message
        st = c.status()
    assert sum(1 for e in st["events"] if e["text"].startswith("loading bad on")) == failed_loads
    with cluster.client() as c:
        # Fixed, says the operator: the model may load again (and here fails again, its fault being still injected).
        assert "reset model bad: it loads again" in c.breaker_reset("bad")
        assert next(m for m in c.status()["models"] if m["name"] == "bad")["health"] == "healthy"


def test_an_operators_cordon_and_uncordon_survive_a_controller_restart(cluster_factory: Any, tiny_model: Path) -> None:
    import signal

    from .test_controller_restart import ready_word, wait_line

    cluster = cluster_factory({"tiny": tiny_model})
    with cluster.client() as c:
        assert "cordoned node-1" in c.cordon("node-1")

    def node_1(st: dict[str, Any]) -> dict[str, Any]:
        return next(n for n in st["nodes"] if n["name"] == "node-1")

    os.kill(int(ready_word(cluster, "pid")), signal.SIGKILL)
    wait_line(cluster, "controller restarted:", 60)
    st = cluster.wait_for(_when(lambda st: st["epoch"] == 2 and len([n for n in st["nodes"] if n["alive"]]) == 2), 60,
                          "the restarted controller with both nodes back")
    # The operator's decision is the store's, not the controller's memory: node-1 is still out of service.
    assert node_1(st)["cordoned"] == "cordoned" and _gpu(st, "node-1")["health"] == "cordoned", st["nodes"]
    assert any("node-1 stays cordoned across the restart" in e["text"] for e in st["events"]), st["events"]
    with cluster.client() as c:
        assert c.complete("tiny", PROMPT, max_tokens=4, temperature=0).finish_reason == "length"
        assert [i["node"] for i in c.status()["instances"]] == ["node-2"]
        assert "uncordoned node-1" in c.uncordon("node-1")
    # And the uncordon is kept too: the next controller does not put the cordon back.
    os.kill(int(wait_line(cluster, "controller restarted: epoch 2", 5).split()[-1]), signal.SIGKILL)
    wait_line(cluster, "controller restarted: epoch 3", 60)
    st = cluster.wait_for(_when(lambda st: st["epoch"] == 3 and len([n for n in st["nodes"] if n["alive"]]) == 2), 60,
                          "the third controller with both nodes back")
    assert node_1(st)["cordoned"] == "" and _gpu(st, "node-1")["health"] == "healthy", st["nodes"]
