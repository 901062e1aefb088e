"""The generation engine on real (tiny, random-weight) transformers models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sllm_actors.gpu.engine import Engine, choose_token
from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model, "cpu")
    return Engine(model, tokenizer)


def _seq(engine: Engine, *, generated: list[int] | None = None, temperature: float = 0.0, seed: int = 7,
         max_tokens: int = 24, stop: list[str] | None = None) -> Sequence:
    return Sequence("r", engine.tokenize(PROMPT, chat=False), list(generated or []),
                    SamplingParams(max_tokens, temperature, 0.9, seed, tuple(stop or ())))


def _run(engine: Engine, seq: Sequence) -> list[int]:
    engine.prefill(seq)
    while not seq.finish_reason:
        engine.step(seq)
    return seq.generated_ids


def test_greedy_equals_model_generate(engine: Engine) -> None:
    ids = engine.tokenize(PROMPT, chat=False)
    expected = engine.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert _run(engine, _seq(engine)) == expected


@pytest.mark.parametrize("cut", [1, 5, 17])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_resume_from_the_token_log_continues_identically(engine: Engine, cut: int, temperature: float) -> None:
    full = _run(engine, _seq(engine, temperature=temperature))
    resumed = _run(engine, _seq(engine, generated=full[:cut], temperature=temperature))
    assert resumed == full


def test_extend_in_rounds_matches_one_prefill(engine: Engine) -> None:
    full = _run(engine, _seq(engine, temperature=0.8))
    seq = _seq(engine, generated=full[:4], temperature=0.8)
    engine.prefill(seq)
    engine.extend(seq, full[4:9])
    engine.extend(seq, full[9:11])
    while not seq.finish_reason:
        engine.step(seq)
    assert seq.generated_ids == full


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine: Engine) -> None:
    a = _run(engine, _seq(engine, temperature=1.0, seed=1))
    b = _run(engine, _seq(engine, temperature=1.0, seed=1))
    c = _run(engine, _seq(engine, temperature=1.0, seed=2))
    assert a == b
    assert a != c


def test_stop_string_ends_the_text_before_it(engine: Engine) -> None:
    full = _seq(engine)
    _run(engine, full)
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick a better stop from {text!r}"
    seq = _seq(engine, stop=[stop])
    _run(engine, seq)
    assert seq.finish_reason == "stop"
    assert seq.text == text[: text.find(stop)]


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([10.0, 9.0, -5.0, -6.0])
    seen = {choose_token(logits, 1.0, 0.5, seed, 0) for seed in range(50)}
    assert seen == {0}
    seen = {choose_token(logits, 1.0, 1.0, seed, 0) for seed in range(200)}
    assert {0, 1} <= seen


def test_chat_template_is_applied(engine: Engine) -> None:
    ids = engine.tokenize("hi", chat=True)
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith("<|im_start|>assistant\n")


def test_text_resumes_exactly_where_a_character_was_split(engine: Engine) -> None:
    """A resume (migration, restart) can fall between the tokens of one character: its bytes were never text, so
    the resumed detokenizer must still produce it, once."""
    from sllm_actors.gpu.detokenizer import IncrementalDetokenizer

    text = "naïve 日本語 — ünïcode ok"
    ids = engine.tokenizer(text)["input_ids"]
    split = [i for i in range(1, len(ids)) if engine.tokenizer.decode(ids[:i]).endswith("\ufffd")]
    assert split, "the tokenizer splits no character across tokens: pick another text"
    for cut in range(len(ids)):
        first = IncrementalDetokenizer(engine.tokenizer, [])
        before = "".join(first.push(i) for i in ids[:cut])
        resumed = IncrementalDetokenizer(engine.tokenizer, ids[:cut])
        assert before + "".join(resumed.push(i) for i in ids[cut:]) == text, cut
