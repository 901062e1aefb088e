"""End to end: `sllm up` in a real process, node processes, ZeroMQ, real tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from sllm_actors.runtime import wire
from sllm_actors.client import Client, ClusterUnavailable, Completion, RequestError, TokenEvent
from sllm_actors.messages import ErrorReply, Hello, StatusRequest

from .conftest import REPO, RunningCluster, with_key

PROMPT = "The capital of France is"


def _reference(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(model_dir, "cpu")
    ids = tokenizer(prompt)["input_ids"]
    return model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()


def test_greedy_through_the_cluster_equals_model_generate(cluster: RunningCluster, tiny_model: Path) -> None:
    expected = _reference(tiny_model, PROMPT, 24)
    with cluster.client() as client:
        events = list(client.generate("tiny", PROMPT, max_tokens=24))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, Completion)
    assert done.token_ids == expected
    assert [t for e in tokens for t in e.token_ids] == expected, "the stream carried every token once, in order"
    assert [e.index for e in tokens] == list(range(len(expected)))
    assert done.text == "".join(e.text for e in tokens)
    assert 0 < done.ttft_s <= done.total_s
    assert done.finish_reason == "length"


def test_concurrent_requests_all_complete(cluster: RunningCluster, tiny_model: Path) -> None:
    expected = _reference(tiny_model, PROMPT, 16)
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        with cluster.client() as client:
            try:
                results[i] = client.complete("tiny", PROMPT, max_tokens=16).token_ids
            except Exception as exc:  # collected and asserted below
                results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[i] == expected for i in range(10)), results


def test_cli_generate_json_and_status(cluster: RunningCluster) -> None:
    env = {**os.environ, "SLLM_CLUSTER": cluster.endpoint}
    run = subprocess.run([sys.executable, str(REPO / "cli.py"), "generate", "tiny", PROMPT, "--max-tokens", "5",
                          "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert {"request_id", "model", "token_ids", "text", "ttft_s", "total_s"} <= set(result)
    assert len(result["token_ids"]) == 5
    run = subprocess.run([sys.executable, str(REPO / "cli.py"), "status", "--json"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert {n["name"] for n in status["nodes"] if n["alive"]} == {"node-1", "node-2"}
    assert all(n["pid"] > 0 for n in status["nodes"])
    assert [i["model"] for i in status["instances"]] == ["tiny"]
    assert {g["device"] for g in status["gpus"]} == {"cpu"}
    assert any("tiny" in t["models"] for t in status["tiers"])


@pytest.mark.parametrize(
    ("kwargs", "code", "fragment"),
    [
        ({"model": "nope"}, "unknown_model", "model 'nope' is not deployed (deployed: tiny)"),
        ({"prompt": "   "}, "bad_request", "the prompt is empty"),
        ({"max_tokens": 0}, "bad_request", "max_tokens must be positive, got 0"),
        ({"top_p": 0.0}, "bad_request", "top_p must be in (0, 1]"),
    ],
)
def test_bad_requests_get_error_replies(cluster: RunningCluster, kwargs: dict[str, Any], code: str,
                                        fragment: str) -> None:
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with cluster.client() as client:
        with pytest.raises(RequestError) as info:
            client.complete(args.pop("model"), args.pop("prompt"), **args)
    assert info.value.code == code
    assert fragment in info.value.message


def test_garbage_on_the_socket_gets_an_error_and_the_cluster_keeps_serving(cluster: RunningCluster) -> None:
    ctx = zmq.Context.instance()
    sock = with_key(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.endpoint)
    try:
        cases = [
            ([b"hello"], "expected 3 frames"),
            ([wire.HEADER, b"", b"\xc1\xc1"], "not valid msgpack"),
            ([b"SLLM/42", b"", b"x"], "protocol version 42 is not supported"),
            (wire.pack(StatusRequest("x"))[:2] + [b"\x92\xa9not-a-tag\x80"], "unknown message tag 'not-a-tag'"),
            ([wire.HEADER, b"", b"\x00" * (17 * 1024 * 1024)], "exceeds the limit"),
        ]
        for frames, fragment in cases:
            sock.send_multipart(frames)
            assert sock.poll(10_000), f"no reply to {frames[:1]}"
            _, reply = wire.unpack(sock.recv_multipart())
            assert isinstance(reply, ErrorReply) and fragment in reply.message, reply
        sock.send_multipart(wire.pack(Hello(99, "client")))
        assert sock.poll(10_000)
        _, reply = wire.unpack(sock.recv_multipart())
        assert isinstance(reply, ErrorReply) and reply.code == "version_mismatch"
    finally:
        sock.close()
    with cluster.client() as client:
        assert len(client.complete("tiny", PROMPT, max_tokens=3).token_ids) == 3


def test_client_to_a_cluster_that_is_not_running_gets_a_clear_timeout() -> None:
    with Client("tcp://127.0.0.1:1", connect_timeout=1.0) as client:
        with pytest.raises(ClusterUnavailable, match=r"no sllm cluster answered at tcp://127.0.0.1:1 within 1s"):
            client.complete("tiny", PROMPT)


def test_a_vanished_client_frees_its_request(cluster: RunningCluster) -> None:
    code = (
        "import sys; from sllm_actors.client import Client\n"
        "c = Client(sys.argv[1])\n"
        "for e in c.generate('tiny', 'hello', max_tokens=100000, request_id='vanishing'):\n"
        "    print('token', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, cluster.endpoint], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("token")
    proc.kill()
    proc.wait()
    cluster.wait_for(lambda st: not any(r["request_id"] == "vanishing" for r in st["requests"]), 30,
                     "the router to drop the vanished client's request")


def test_sigkilled_node_is_restarted_and_seen_again(cluster: RunningCluster) -> None:
    before = cluster.node_pids()
    os.kill(before["node-1"], signal.SIGKILL)
    after = cluster.wait_for(
        lambda st: {n["name"]: n["pid"] for n in st["nodes"] if n["alive"]}.get("node-1", before["node-1"])
        != before["node-1"] and {n["name"]: n["pid"] for n in st["nodes"] if n["alive"]},
        30, "node-1 to come back with a new pid",
    )
    assert after["node-2"] == before["node-2"]
    with cluster.client() as client:
        assert len(client.complete("tiny", PROMPT, max_tokens=3).token_ids) == 3


def test_a_request_survives_its_node_being_killed(cluster: RunningCluster, tiny_model: Path) -> None:
    expected = _reference(tiny_model, PROMPT, 400)
    seen: list[int] = []
    with cluster.client() as client:
        stream = client.generate("tiny", PROMPT, max_tokens=400)
        for event in stream:
            if isinstance(event, TokenEvent):
                seen.extend(event.token_ids)
                if len(seen) == 20:
                    node = next(r["node"] for r in client_status(cluster)["requests"])
                    os.kill(cluster.node_pids()[node], signal.SIGKILL)
            else:
                assert isinstance(event, Completion)
                done = event
    assert seen == expected, "one stream, no token lost or repeated"
    assert done.token_ids == expected
    assert any(m["kind"] == "resume" for m in done.migrations)


def client_status(cluster: RunningCluster) -> dict[str, Any]:
    with cluster.client() as c:
        return c.status()


def test_deploy_registers_a_model(cluster_factory: Any, tiny_model: Path, tiny_model_b: Path,
                                  tmp_path: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model},
                              extra={"models_roots": [str(tiny_model_b.parent), str(tmp_path)]})
    with cluster.client() as client:
        assert "deployed gpt" in client.deploy("gpt", str(tiny_model_b))
        assert len(client.complete("gpt", PROMPT, max_tokens=4).token_ids) == 4
        with pytest.raises(RequestError, match="not a model directory"):
            client.deploy("bad", str(tmp_path))


def test_malformed_topology_is_reported_by_sllm_up(tmp_path: Path) -> None:
    bad = tmp_path / "topology.yaml"
    bad.write_text("nodes: [{name: a, gpus: [{device: tpu}]}]\n")
    run = subprocess.run([sys.executable, str(REPO / "cli.py"), "up", str(bad), "--headless"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert "nodes[0].gpus[0].device: expected 'cpu' or 'cuda:N', got 'tpu'" in run.stderr
    assert str(bad) in run.stderr.replace("\n", "")


def test_a_frozen_node_is_declared_dead_then_comes_back_and_drops_its_orphans(cluster: RunningCluster) -> None:
    with cluster.client() as client:
        assert len(client.complete("tiny", PROMPT, max_tokens=3).token_ids) == 3
        node = client.status()["instances"][0]["node"]
    pid = cluster.node_pids()[node]
    os.kill(pid, signal.SIGSTOP)  # silent, not dead: the registry can only judge by missed beats
    try:
        cluster.wait_for(lambda st: not next(n for n in st["nodes"] if n["name"] == node)["alive"], 30,
                         f"{node} to be declared dead after missed heartbeats")
    finally:
        os.kill(pid, signal.SIGCONT)
    st = cluster.wait_for(
        lambda st: st if next(n for n in st["nodes"] if n["name"] == node)["alive"]
        and any(e["text"].startswith(f"{node} back") for e in st["events"]) else None,
        30, f"{node} to come back",
    )
    assert next(n for n in st["nodes"] if n["name"] == node)["pid"] == pid, "the same process, not a restart"
    cluster.wait_for(
        lambda st: next(n for n in st["nodes"] if n["name"] == node)["instances_reported"] == 0, 30,
        "the orphaned instance to be unloaded",
    )
    with cluster.client() as client:
        assert len(client.complete("tiny", PROMPT, max_tokens=3).token_ids) == 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_node_to_node_frames_are_relayed_only_between_topology_nodes(cluster_factory: Any, tiny_model: Path) -> None:
    """The controller passes frames addressed to a node on unread, but only from a node of the topology: an
    impostor's are decoded and refused; a node's garbage reaches its peer, which refuses it and goes on."""
    from sllm_actors.messages import UnloadModel

    port = _free_port()
    cluster = cluster_factory({"tiny": tiny_model}, extra={"controller": {"cluster_port": port}})
    with cluster.client() as client:
        assert len(client.complete("tiny", PROMPT, max_tokens=3).token_ids) == 3
        st = client.status()
    (instance_id, node), = {(i["instance_id"], i["node"]) for i in st["instances"]}
    other = "node-2" if node == "node-1" else "node-1"
    ctx = zmq.Context.instance()
    # Both hold a real node key: what the controller checks past the handshake is the name they claim.
    impostor, peer = with_key(ctx.socket(zmq.DEALER), other), with_key(ctx.socket(zmq.DEALER), other)
    try:
        impostor.setsockopt(zmq.IDENTITY, b"intruder")
        peer.setsockopt(zmq.IDENTITY, f"{other}~test".encode())
        for sock in (impostor, peer):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")
        impostor.send_multipart(wire.pack(UnloadModel(instance_id), node))
        assert impostor.poll(10_000), "the impostor got no answer"
        _, reply = wire.unpack(impostor.recv_multipart())
        assert isinstance(reply, ErrorReply) and reply.code == "rejected" and "intruder" in reply.message, reply
        peer.send_multipart([wire.HEADER, node.encode(), b"\xc1\xc1"])  # garbage, relayed to the node
    finally:
        impostor.close()
        peer.close()
    with cluster.client() as client:
        assert len(client.complete("tiny", PROMPT, max_tokens=3).token_ids) == 3
        st = client.status()
    assert any(i["instance_id"] == instance_id for i in st["instances"]), "the impostor's unload was obeyed"
    assert all(n["alive"] and n["restarts"] == 0 for n in st["nodes"]), st["nodes"]
