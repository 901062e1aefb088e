"""The OpenAI-compatible HTTP API of a real cluster (`sllm up`, node processes, real models), driven with the
official `openai` client and raw httpx for the wire format."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import REPO, RunningCluster, start_cluster, stop_cluster, write_topology

KEY = "sk-test-0123456789"
PROMPT = "Once upon a time there was a small model"
CANCEL_S = 8.0
"""How soon a disconnected request must leave: far less than the 25 s or more it would run uncancelled."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_endpoint(cluster: RunningCluster) -> str:
    line = next(ln for ln in cluster.lines if ln.startswith("ready:"))
    words = line.split()
    return words[words.index("http") + 2]


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, slow_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One cluster for the whole module, with an API key; the tests that kill a node run last."""
    topo = write_topology(tmp_path_factory.mktemp("http") / "topology.yaml", {"tiny": tiny_model, "slow": slow_model},
                          extra={"controller": {"http_port": free_port()},
                                 "scheduler": {"migration_transfer": "recompute"}})
    running = start_cluster(topo, env={"SLLM_API_KEY": KEY})
    try:
        yield running
    finally:
        stop_cluster(running)


@pytest.fixture(scope="module")
def base(cluster: RunningCluster) -> str:
    return http_endpoint(cluster)


@pytest.fixture(scope="module")
def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


def zmq_text(cluster: RunningCluster, model: str, prompt: str, **kwargs: Any) -> Any:
    with cluster.client() as c:
        return c.complete(model, prompt, **kwargs)


# ---------------------------------------------------------------------------------------------- shapes


def test_greedy_over_http_equals_the_zeromq_client(cluster: RunningCluster, oai: openai.OpenAI) -> None:
    want = zmq_text(cluster, "tiny", PROMPT, max_tokens=24, temperature=0.0)
    got = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.object == "text_completion" and got.model == "tiny" and got.id.startswith("cmpl-")
    assert got.choices[0].text == want.text and got.choices[0].index == 0
    assert got.choices[0].finish_reason == ("length" if want.finish_reason in ("length", "context") else "stop")
    assert got.usage is not None
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == want.prompt_tokens > 0
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens

    want_chat = zmq_text(cluster, "tiny", "Hello world", max_tokens=16, temperature=0.0, chat=True)
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello world"}],
                                       max_tokens=16, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == want_chat.text
    assert chat.usage is not None and chat.usage.prompt_tokens == want_chat.prompt_tokens


def test_streaming_gives_the_same_text_as_one_response(oai: openai.OpenAI) -> None:
    full = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=20, temperature=0)
    stream = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                         max_tokens=20, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    done = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    streamed = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    assert streamed[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_return_token_ids_gives_each_choices_tokens(cluster: RunningCluster, base: str) -> None:
    """vLLM's ``return_token_ids``: the ids streamed delta by delta, and in a whole response, are the ZeroMQ
    client's for the same greedy request (what bench_soak.py checks streams against); without it, no ids."""
    want = zmq_text(cluster, "tiny", PROMPT, max_tokens=24, temperature=0.0)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "return_token_ids": True}
    whole = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60).json()
    assert whole["choices"][0]["token_ids"] == want.token_ids
    ids: list[int] = []
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[len("data: "):])["choices"]
                ids += choices[0].get("token_ids", []) if choices else []
    assert ids == want.token_ids
    plain = httpx.post(f"{base}/v1/completions", json={**body, "return_token_ids": False}, headers=headers,
                       timeout=60).json()
    assert "token_ids" not in plain["choices"][0]


def test_n2_and_a_list_of_prompts_are_separate_choices(oai: openai.OpenAI) -> None:
    greedy = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text  # greedy: two runs of one computation
    assert greedy.usage is not None and greedy.usage.completion_tokens == 24

    sampled = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=16, temperature=1.0, seed=5, n=2)
    assert [c.index for c in sampled.choices] == [0, 1]
    # Each choice has its own seed (seed + index): n samples, not one sample n times.
    assert sampled.choices[0].message.content != sampled.choices[1].message.content

    stream = list(oai.completions.create(model="tiny", prompt=[PROMPT, "Hello world"], max_tokens=8,
                                         temperature=0, n=2, stream=True))
    texts: dict[int, str] = {}
    for c in stream:
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts[0] == texts[1] == greedy.choices[0].text[: len(texts[0])]
    assert texts[2] == texts[3] and texts[2] != texts[0]


def test_same_seed_twice_gives_identical_output(oai: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                        max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return r.choices[0].message.content or ""

    first, second = sample(1234), sample(1234)
    assert first == second
    assert sample(4321) != first  # the seed is what made them equal, not a greedy path


def test_stop_strings_end_the_text_before_them(oai: openai.OpenAI) -> None:
    text = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    at = next(i for i in range(4, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].isalnum())
    stop = text[at:at + 2]
    cut = text.find(stop)
    got = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "\u2603"])
    assert got.choices[0].text == text[:cut] and got.choices[0].finish_reason == "stop"
    streamed = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_conversation_is_rendered_with_the_models_template(cluster: RunningCluster, oai: openai.OpenAI,
                                                             tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hello world"}, {"role": "user", "content": "how are you"}]
    rendered = AutoTokenizer.from_pretrained(str(tiny_model)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    want = zmq_text(cluster, "tiny", rendered, max_tokens=16, temperature=0.0)
    got = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert got.choices[0].message.content == want.text
    assert got.usage is not None and got.usage.prompt_tokens == want.prompt_tokens


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"n": 0}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"extra_body": {"temperature": "hot"}}, "temperature"),
    ({"extra_body": {"max_tokens": 1.5}}, "max_tokens"),
    ({"logprobs": 2}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"extra_body": {"cache_salt": ""}}, "cache_salt"),
    ({"extra_body": {"cache_salt": 7}}, "cache_salt"),
])
def test_bad_parameters_are_a_400_naming_the_parameter(oai: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    args: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(**args)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    assert body["type"] == "invalid_request_error" and param in body["message"]


def test_bad_chat_messages_and_stream_options(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="messages"):
        oai.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="role"):
        oai.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}], max_tokens=4)  # type: ignore[list-item,misc]
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    max_completion_tokens=-3)
    assert info.value.body["param"] == "max_completion_tokens"  # type: ignore[index]


def test_unknown_fields_are_ignored(base: str) -> None:
    r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "user": "me",
                         "ignore_eos": True, "some_vendor_field": {"x": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_keys_unknown_models_and_garbage(base: str, oai: openai.OpenAI) -> None:
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "messages": []}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key" and set(r.json()["error"]) == {"message", "type", "param",
                                                                                          "code"}
    with pytest.raises(openai.NotFoundError, match="nope"):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="hi", max_tokens=2, stream=True)
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{base}/v1/completions", content=b"{not json", headers=auth, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/completions", json=[1, 2], headers=auth, timeout=30)
    assert r.status_code == 400
    r = httpx.get(f"{base}/v1/nothing-here", headers=auth, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- wire format


def test_sse_wire_format(base: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e.strip() and not e.startswith(":")]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" and p["model"] == "tiny" for p in payloads)
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_models_health_and_metrics(base: str, oai: openai.OpenAI) -> None:
    oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    # The front end learns of the instance from the state feed, a moment after the answer (run alone, this test
    # once looked before it had).
    deadline = time.monotonic() + 10
    while True:
        models = {m.id: m for m in oai.models.list().data}
        if models["tiny"].model_dump()["state"] != "cold" or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # polling a condition with a deadline
    assert set(models) == {"tiny", "slow"}
    tiny = models["tiny"].model_dump()
    assert tiny["owned_by"] == "sllm" and tiny["state"] in ("loaded", "serving") and tiny["instances"]
    assert tiny["checkpoint"]["source"].endswith("tiny-llama")
    assert oai.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")

    health = httpx.get(f"{base}/health", timeout=30)
    assert health.status_code == 200 and sorted(health.json()["nodes_alive"]) == ["node-1", "node-2"]

    text = httpx.get(f"{base}/metrics", timeout=30).text
    samples = _samples(text)
    assert samples[('sllm_requests_total', '{model="tiny",outcome="success"}')] >= 1
    assert samples[('sllm_time_to_first_token_seconds_count', '{model="tiny"}')] >= 1
    assert samples[('sllm_generation_tokens_total', '{model="tiny"}')] >= 3
    assert samples[("sllm_controller_up", "")] == 1
    assert samples[('sllm_nodes', '{alive="true"}')] == 2
    assert any(name == "sllm_cold_starts_total" for name, _ in samples)
    read = [v for (name, labels), v in samples.items() if name == "sllm_cold_start_part_seconds_total" and 'part="read"' in labels]
    assert read and read[0] > 0, "where the loads' time went"
    assert any(name == "sllm_instances" and 'model="tiny"' in labels for name, labels in samples)
    assert all(line.startswith("sllm_") for line in text.splitlines() if line and not line.startswith("#"))


def _samples(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            out[(name, "{" + labels if labels else "")] = float(value)
    return out


# ---------------------------------------------------------------------------------------------- cancel


def _requests(cluster: RunningCluster) -> list[str]:
    with cluster.client() as c:
        return [r["request_id"] for r in c.status()["requests"]]


def test_a_disconnected_stream_cancels_its_request(cluster: RunningCluster, base: str) -> None:
    body = {"model": "slow", "prompt": PROMPT, "max_tokens": 100000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        first = json.loads(next(ln for ln in lines if ln.startswith("data: "))[len("data: "):])
        request_id = f"{first['id']}-0"
        cluster.wait_for(lambda st: any(q["request_id"] == request_id and q["tokens"] > 0 for q in st["requests"]),
                         30, "the request to run")
    # Leaving the block closed the connection. Uncancelled, the request would run to the model's context
    # (about 4000 more tokens, 25 s or more); cancelled, it leaves within a fraction of a second.
    cluster.wait_for(lambda st: not any(q["request_id"] == request_id for q in st["requests"]) and
                     not any(request_id in i["requests"] for i in st["instances"]), CANCEL_S,
                     "the request to leave the router and its instance")


def test_a_disconnected_plain_request_cancels_too(cluster: RunningCluster, base: str) -> None:
    """No stream: the handler never reads the connection again, yet it learns the client left."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"model": "slow", "prompt": PROMPT, "max_tokens": 100000, "temperature": 0}).encode()
    before = set(_requests(cluster))
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        new = cluster.wait_for(lambda st: [q["request_id"] for q in st["requests"]
                                           if q["request_id"] not in before and q["tokens"] > 0], 30,
                               "the plain request to run")
    cluster.wait_for(lambda st: not any(q["request_id"] in new for q in st["requests"]), CANCEL_S,
                     "the plain request to be cancelled")


# ---------------------------------------------------------------------------------------------- one stream


def _stream_with_action(base: str, at_chunks: int, action: Any,
                        max_tokens: int) -> tuple[str, str, list[str], int]:
    body = {"model": "slow", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, finish, ids, errors, tokens = "", "", [], [], -1
    worker: threading.Thread | None = None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=180,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[len("data: "):])
            assert "error" not in payload, payload
            if payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
            if not payload["choices"]:
                continue
            ids.append(payload["id"])
            text += payload["choices"][0]["text"]
            finish = payload["choices"][0]["finish_reason"] or finish
            if len(ids) == at_chunks:
                def run(request_id: str = f"{payload['id']}-0") -> None:
                    try:
                        action(request_id)
                    except BaseException as exc:  # surfaced below
                        errors.append(exc)
                worker = threading.Thread(target=run, daemon=True)
                worker.start()
    assert worker is not None
    worker.join(60)
    assert not errors, errors
    return text, finish, ids, tokens


def _same_stream(got: str, tokens: int, want: Any) -> None:
    """No token lost or repeated: the token count, and the text wherever it is ASCII.

    Only ASCII because the engine's detokenizer starts afresh where a request resumes or is handed over
    (sllm_actors/gpu/detokenizer.py, IncrementalDetokenizer): when the interruption splits a multi-byte UTF-8
    character across two tokens, the held-back byte's character may come out as U+FFFD or not at all, for
    the ZeroMQ client's text too. A random-weight model emits many such tokens; the ASCII around them still
    shows any gap or repeat."""
    assert tokens == len(want.token_ids), (tokens, len(want.token_ids))

    def ascii_only(text: str) -> str:
        return "".join(ch for ch in text if ch.isascii())

    assert ascii_only(got) == ascii_only(want.text), "one stream: no text lost or repeated"


def test_an_http_stream_migrated_mid_way_stays_one_stream(cluster: RunningCluster, base: str) -> None:
    from .test_migration import _instance_on_both_nodes

    _instance_on_both_nodes(cluster)  # a warm destination: the migration lands while tokens still flow
    want = zmq_text(cluster, "slow", PROMPT, max_tokens=300, temperature=0.0)
    acks: list[str] = []

    def migrate(request_id: str) -> None:
        with cluster.client() as c:
            where = next(r["node"] for r in c.status()["requests"] if r["request_id"] == request_id)
            acks.append(c.migrate(request_id, "node-2" if where == "node-1" else "node-1"))

    text, finish, ids, tokens = _stream_with_action(base, 20, migrate, 300)
    assert acks and acks[0].startswith("migrated"), acks
    _same_stream(text, tokens, want)
    assert finish == ("length" if want.finish_reason in ("length", "context") else "stop") and len(set(ids)) == 1
    samples = _samples(httpx.get(f"{base}/metrics", timeout=30).text)
    assert samples.get(("sllm_request_migrations_total",
                        '{kind="migration",outcome="done",transfer="recompute"}'), 0) >= 1, samples


def test_an_http_stream_survives_its_node_being_killed(cluster: RunningCluster, base: str) -> None:
    want = zmq_text(cluster, "slow", PROMPT, max_tokens=300, temperature=0.0)

    def kill(request_id: str) -> None:
        with cluster.client() as c:
            node = next(r["node"] for r in c.status()["requests"] if r["request_id"] == request_id)
        os.kill(cluster.node_pids()[node], signal.SIGKILL)

    text, _, _, tokens = _stream_with_action(base, 20, kill, 300)
    _same_stream(text, tokens, want)
    samples = _samples(httpx.get(f"{base}/metrics", timeout=30).text)
    assert sum(v for (name, labels), v in samples.items()
               if name == "sllm_request_migrations_total" and 'kind="resume"' in labels) >= 1


# ---------------------------------------------------------------------------------------------- sllm up


def test_an_http_port_in_use_is_reported_by_sllm_up(tmp_path: Path, tiny_model: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        topo = write_topology(tmp_path / "topology.yaml", {"tiny": tiny_model},
                              extra={"controller": {"http_port": port}})
        r = subprocess.run([sys.executable, str(REPO / "cli.py"), "up", str(topo), "--headless"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "SLLM_HOME": str(tmp_path / "home")})
    assert r.returncode != 0
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in r.stderr and "--http-port" in r.stderr, r.stderr


def test_http_port_in_the_topology_is_checked(tmp_path: Path) -> None:
    from sllm_actors.runtime.topology import TopologyError, parse_topology

    base = {"nodes": [{"name": "n", "gpus": [{"device": "cpu"}]}]}
    assert parse_topology(base, tmp_path / "t.yaml").controller.http_port == 8000
    with pytest.raises(TopologyError, match=r"controller.http_port: port must be 0..65535"):
        parse_topology({**base, "controller": {"http_port": 70000}}, tmp_path / "t.yaml")
    with pytest.raises(TopologyError, match=r"controller: ports must differ"):
        parse_topology({**base, "controller": {"http_port": 7700}}, tmp_path / "t.yaml")


def test_each_api_key_salts_its_own_prefix_cache() -> None:
    from sllm_actors.http.openai_api import parse_completion, tenant_salt

    a, b = tenant_salt("sk-tenant-a"), tenant_salt("sk-tenant-b")
    assert a and b and a != b, "two tenants never share prefix blocks"
    assert "sk-tenant-a" not in a, "the salt travels to every node: never the key itself"
    assert tenant_salt("sk-tenant-a") == a, "one tenant's requests share with each other"
    assert tenant_salt("sk-tenant-a", "chat-7") not in (a, tenant_salt("sk-tenant-b", "chat-7"))
    assert tenant_salt("", "chat-7") == "chat-7" and tenant_salt("") == "", "an open front end: the request's own"
    job = parse_completion({"model": "tiny", "prompt": "hi", "cache_salt": "chat-7"})
    assert job.cache_salt == "chat-7"


def test_api_keys_from_flags_and_the_environment() -> None:
    from sllm_actors.http import parse_api_keys

    # --api-key values first, then SLLM_API_KEY's comma-separated list; blanks and repeats dropped.
    assert parse_api_keys("sk-a", " sk-b ", "sk-a,, sk-c") == ["sk-a", "sk-b", "sk-c"]
    assert parse_api_keys("", " , ") == []


def _children(pid: int) -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue
    return out


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_front_end_stops_when_sllm_up_is_killed(tmp_path: Path, tiny_model: Path) -> None:
    """sllm up killed -9 runs no cleanup: its HTTP front end must notice on its own and free the port."""
    port = free_port()
    topo = write_topology(tmp_path / "topology.yaml", {"tiny": tiny_model}, nodes=1,
                          extra={"controller": {"http_port": port}})
    cluster = start_cluster(topo)
    children = _children(cluster.proc.pid)
    front = [p for p, cmd in children.items() if "sllm_actors.http" in cmd]
    try:
        assert len(front) == 1, children
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
    finally:
        cluster.proc.kill()
        cluster.proc.wait()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _gone(front[0]):
            time.sleep(0.1)  # polling a condition with a deadline
        assert _gone(front[0]), "the HTTP front end outlived sllm up"
    finally:
        for pid in children:  # the nodes exit on their own later; this test does not wait for that
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
