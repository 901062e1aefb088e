"""The output processor (gpu/output.py): text and stop strings off the step thread give the client exactly what
the step thread's own check gave, and every message leaves in the order it was queued."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.gpu.engine import Engine
from sllm_actors.gpu.output import OutputProcessor, StepTokens, find_stop
from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import InferenceDone, Message, SamplingParams, TokenBatch

PROMPTS = [f"Story number {i}: once upon a time" for i in range(6)]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model, "cpu")
    return Engine(model, tokenizer, deterministic=True)


def _seqs(engine: Engine, stops: list[list[str]]) -> list[Sequence]:
    return [Sequence(f"r{i}", engine.tokenize(p, chat=False), [],
                     SamplingParams(MAX_TOKENS, 0.0 if i % 2 else 0.9, 1.0, 10 + i, tuple(stop)))
            for i, (p, stop) in enumerate(zip(PROMPTS, stops))]


def _inline(engine: Engine, stops: list[list[str]]) -> dict[str, tuple[list[int], str, str]]:
    """request -> (token ids, text, finish reason) with the step thread detokenizing (the reference)."""
    engine.detokenize = True
    seqs = _seqs(engine, stops)
    out: dict[str, tuple[list[int], str, str]] = {s.request_id: ([], "", "") for s in seqs}
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        result = engine.step_batch()
        for t in result.tokens:
            ids, text, _ = out[t.seq.request_id]
            out[t.seq.request_id] = (ids + [t.token], text + t.text, t.seq.finish_reason)
    return out


def _processed(engine: Engine, stops: list[list[str]]) -> tuple[dict[str, tuple[list[int], str, str]], list[Message]]:
    """The same through the output processor, the engine's stop strings left to it, as the instance drives it."""
    engine.detokenize = False
    seqs = _seqs(engine, stops)
    sent: list[Message] = []
    stopped: list[str] = []
    lock = threading.Lock()

    def on_stop(request_id: str, n_generated: int) -> None:
        with lock:
            stopped.append(request_id)

    processor = OutputProcessor(engine.tokenizer, "inst", lambda msg, address: sent.append(msg), on_stop)
    try:
        for seq in seqs:
            engine.add(seq)
        while engine.has_work():
            result = engine.step_batch()
            processor.tokens(StepTokens([(t.seq, t.index, t.token, t.token in engine.eos_ids) for t in result.tokens]))
            for seq in result.finished:
                processor.message(InferenceDone(seq.request_id, "inst", seq.finish_reason, len(seq.generated_ids)))
            with lock:
                gone, stopped[:] = list(stopped), []
            for request_id in gone:  # the instance's StopHit: the request leaves the batch
                engine.remove(request_id)
        assert processor.drain()
    finally:
        processor.close()
        engine.detokenize = True
    out: dict[str, tuple[list[int], str, str]] = {s.request_id: ([], "", "") for s in seqs}
    for msg in sent:
        if isinstance(msg, TokenBatch):
            for request_id, token_ids, text in zip(msg.request_ids, msg.token_ids, msg.texts):
                ids, have, reason = out[request_id]
                out[request_id] = (ids + token_ids, have + text, reason)
        elif isinstance(msg, InferenceDone):
            ids, have, reason = out[msg.request_id]
            assert not reason, f"{msg.request_id} ended twice"
            assert msg.n_generated == len(ids)
            out[msg.request_id] = (ids, have, msg.finish_reason)
    return out, sent


def test_find_stop() -> None:
    assert find_stop("hello wor", "ld!", ["world"]) == 6
    assert find_stop("hello", " there", ["xyz"]) == -1
    assert find_stop("a", "", ["a"]) == -1


def test_processor_sends_what_the_step_thread_sent(engine: Engine) -> None:
    plain = _inline(engine, [[] for _ in PROMPTS])
    # Stops cut from each stream's own text (some streams without one), so most streams end at a stop string.
    stops: list[list[str]] = []
    for i, (_, text, _) in enumerate(plain.values()):
        middle = text[len(text) // 3: len(text) // 3 + 2]
        stops.append([middle, "\u2603"] if i % 3 != 2 and middle.strip() else [])
    reference = _inline(engine, stops)
    assert sum(reason == "stop" for _, _, reason in reference.values()) >= 2, "pick stops that cut some streams"
    got, sent = _processed(engine, stops)
    assert got == reference
    # Each request's InferenceDone comes after its every TokenBatch entry.
    last_tokens = {}
    done_at = {}
    for position, msg in enumerate(sent):
        if isinstance(msg, TokenBatch):
            for request_id in msg.request_ids:
                last_tokens[request_id] = position
        elif isinstance(msg, InferenceDone):
            done_at[msg.request_id] = position
    assert set(done_at) == set(reference)
    assert all(last_tokens[r] < done_at[r] for r in done_at)


def test_messages_keep_their_order(engine: Engine) -> None:
    sent: list[Any] = []
    processor = OutputProcessor(engine.tokenizer, "inst", lambda msg, address: sent.append((msg, address)),
                                lambda request_id, n: None)
    try:
        messages = [InferenceDone(f"r{i}", "inst", "length", i) for i in range(50)]
        for i, msg in enumerate(messages):
            processor.message(msg, f"node-{i}")
        assert processor.drain()
    finally:
        processor.close()
    assert sent == [(m, f"node-{i}") for i, m in enumerate(messages)]
