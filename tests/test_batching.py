"""The batching engine against transformers, on tiny random-weight models of each architecture served.

Logits are compared under teacher forcing (the same tokens fed to both, whatever either would have sampled):
free-running greedy equality over long outputs is fragile with random weights. Tolerances: max |Δlogit|
≤ 1e-4 in float32, ≤ 0.06 in bfloat16 (logits of these models are O(1); bf16 keeps 8 bits of mantissa and the
engine's packed attention sums in another order than transformers' per-request SDPA).
"""

from __future__ import annotations

import copy
import random
import struct
from typing import Any

import pytest
import torch

from sllm_actors.gpu.engine import Engine
from sllm_actors.gpu.sampler import sample, step_seed
from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import SamplingParams
from sllm_eval.tiny_models import make_tokenizer

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.06}
ARCHITECTURES = ["llama", "qwen2", "mistral", "gpt2"]


def _config(arch: str, vocab: int, eos: int) -> Any:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=eos)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, eos_token_id=eos)
    raise AssertionError(arch)


def _models(arch: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Any]:
    """(model for the engine, an untouched copy running transformers' SDPA, tokenizer)."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = _config(arch, len(tokenizer), tokenizer.eos_token_id)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    stock = copy.deepcopy(model)
    return model, stock, tokenizer


def _random_tokens(n: int, vocab: int, eos: int, rng: random.Random) -> list[int]:
    return [t for t in (rng.randrange(5, vocab) for _ in range(n * 2)) if t != eos][:n]


def _serve(engine: Engine, seqs: list[Sequence], together: bool) -> None:
    """All requests sharing the engine's batches, or each run to its end before the next is added."""
    for seq in seqs:
        engine.add(seq)
        if not together:
            while engine.has_work():
                engine.step_batch()
    while engine.has_work():
        engine.step_batch()


def _teacher_forced(engine: Engine, forced: dict[str, list[int]], prompt_lens: dict[str, int],
                    together: bool) -> dict[str, torch.Tensor]:
    """Run each request through the engine, feeding the forced tokens instead of sampled ones; returns the logits
    the engine computed at each sampling step, ``[steps, vocab]`` per request."""
    rows: dict[str, list[torch.Tensor]] = {}

    def forced_sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        chosen = []
        for row, seq in zip(logits, seqs):
            rows.setdefault(seq.request_id, []).append(row.float().cpu())
            chosen.append(forced[seq.request_id][len(seq.tokens)])
        return chosen

    engine._sample = forced_sample  # type: ignore[method-assign]
    seqs = [Sequence(rid, ids[: prompt_lens[rid]], [], SamplingParams(len(ids) - prompt_lens[rid] - 1, 0.0, 1.0, 0))
            for rid, ids in forced.items()]
    _serve(engine, seqs, together)
    assert all(s.generated_ids == forced[s.request_id][len(s.prompt_ids):-1] for s in seqs)
    return {rid: torch.stack(r) for rid, r in rows.items()}


def _reference(stock: Any, forced: dict[str, list[int]], prompt_lens: dict[str, int]) -> dict[str, torch.Tensor]:
    out = {}
    with torch.inference_mode():
        for rid, ids in forced.items():
            logits = stock(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
            out[rid] = logits[prompt_lens[rid] - 1:-1]  # one row per sampled token
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers_alone_and_in_a_mixed_batch(arch: str, dtype: torch.dtype) -> None:
    model, stock, tokenizer = _models(arch, dtype)
    rng = random.Random(1)
    lengths = [(3, 6), (40, 8), (17, 12), (1, 9), (64, 5), (9, 10), (29, 7), (5, 11)]
    forced = {f"r{i}": _random_tokens(p + n + 1, len(tokenizer), tokenizer.eos_token_id, rng)
              for i, (p, n) in enumerate(lengths)}
    prompt_lens = {f"r{i}": p for i, (p, _) in enumerate(lengths)}
    expected = _reference(stock, forced, prompt_lens)
    # A small token budget cuts the long prompts into chunks that share steps with other requests' decodes.
    engine = Engine(model, tokenizer, kv_cache_bytes=8 * 1024**2, max_batched_tokens=24)
    for together in (False, True):
        got = _teacher_forced(engine, forced, prompt_lens, together)
        for rid in forced:
            assert got[rid].shape == expected[rid].shape
            delta = (got[rid] - expected[rid]).abs().max().item()
            assert delta <= TOLERANCE[dtype], f"{arch} {dtype} {rid} together={together}: max |Δlogit| {delta}"
    assert engine.kv_usage()[0] == 0, "every block is free once every request finished"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padded_prefill_steps_match_transformers(arch: str) -> None:
    # The forward a prefill graph captures (prompts padded to a few shapes, segment ids and a device-built mask
    # in place of per-step host tensors), run eagerly on a CPU: the graphs themselves need CUDA
    # (tests/test_engine_cuda.py), what they compute is checked here. Chunks with a context (a long prompt's later
    # chunks) and steps that also decode take the same path.
    model, stock, tokenizer = _models(arch)
    rng = random.Random(2)
    lengths = [(3, 6), (40, 8), (17, 12), (1, 9), (64, 5), (9, 10), (29, 7), (5, 11)]
    forced = {f"r{i}": _random_tokens(p + n + 1, len(tokenizer), tokenizer.eos_token_id, rng)
              for i, (p, n) in enumerate(lengths)}
    prompt_lens = {f"r{i}": p for i, (p, _) in enumerate(lengths)}
    expected = _reference(stock, forced, prompt_lens)
    engine = Engine(model, tokenizer, kv_cache_bytes=8 * 1024**2, max_batched_tokens=48)
    engine.runner.pad_prefills = True
    shapes: list[tuple[int, int, int]] = []
    forward = engine.runner._prefill_forward

    prompts_per_step: list[int] = []

    def counted(inputs: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        shapes.append(shape)
        prompts_per_step.append(int(inputs[3 * shape[0]:4 * shape[0]].max()) + 1)  # segment ids 0 .. n-1
        return forward(inputs, shape)

    engine.runner._prefill_forward = counted  # type: ignore[method-assign]
    for together in (False, True):
        got = _teacher_forced(engine, forced, prompt_lens, together)
        for rid in forced:
            delta = (got[rid] - expected[rid]).abs().max().item()
            assert delta <= TOLERANCE[torch.float32], f"{arch} {rid} together={together}: max |Δlogit| {delta}"
    assert any(context > tokens for tokens, context, _ in shapes), "a chunk with a context ran padded"
    assert max(prompts_per_step) > 1, "a step of several prompts ran padded"
    assert engine.kv_usage()[0] == 0


def _greedy(engine: Engine, prompts: dict[str, list[int]], max_tokens: int, together: bool) -> dict[str, list[int]]:
    seqs = [Sequence(rid, ids, [], SamplingParams(max_tokens, 0.0, 1.0, 0)) for rid, ids in prompts.items()]
    _serve(engine, seqs, together)
    return {s.request_id: s.generated_ids for s in seqs}


def test_deterministic_mode_gives_each_request_its_output_alone() -> None:
    model, _, tokenizer = _models("llama")
    rng = random.Random(2)
    prompts = {f"r{i}": _random_tokens(n, len(tokenizer), tokenizer.eos_token_id, rng)
               for i, n in enumerate([5, 33, 12, 70, 2, 18, 45, 9])}
    engine = Engine(model, tokenizer, kv_cache_bytes=8 * 1024**2, max_batched_tokens=32, deterministic=True)
    assert _greedy(engine, prompts, 20, together=True) == _greedy(engine, prompts, 20, together=False)


def test_a_full_pool_preempts_and_recomputes_without_losing_a_token() -> None:
    model, _, tokenizer = _models("llama")
    rng = random.Random(3)
    prompts = {f"r{i}": _random_tokens(20, len(tokenizer), tokenizer.eos_token_id, rng) for i in range(4)}
    roomy = Engine(model, tokenizer, kv_cache_bytes=8 * 1024**2)
    alone = _greedy(roomy, prompts, 40, together=False)
    # 4 requests of up to 60 tokens need 16 blocks of 16; this pool has 10: some must wait their turn twice.
    per_block = roomy.kv_bytes_per_token * 16
    tight = Engine(copy.deepcopy(model), tokenizer, kv_cache_bytes=11 * per_block)
    assert tight.blocks.capacity_blocks == 10
    assert _greedy(tight, prompts, 40, together=True) == alone
    assert tight.preemptions > 0
    assert tight.kv_usage()[0] == 0


def test_requests_that_can_never_fit_are_refused_with_the_limit() -> None:
    model, _, tokenizer = _models("llama")
    engine = Engine(model, tokenizer, kv_cache_bytes=5 * engine_block_bytes(model, tokenizer))
    with pytest.raises(ValueError, match="exceed the model's context of 256"):
        engine.add(Sequence("long", list(range(5, 300)), [], SamplingParams(10, 0.0, 1.0, 0)))
    with pytest.raises(ValueError, match="KV pool holds 64"):
        engine.add(Sequence("big", list(range(5, 55)), [], SamplingParams(20, 0.0, 1.0, 0)))
    engine.add(Sequence("fits", list(range(5, 25)), [], SamplingParams(20, 0.0, 1.0, 0)))
    while engine.has_work():
        engine.step_batch()


def engine_block_bytes(model: Any, tokenizer: Any) -> int:
    return Engine(model, tokenizer, kv_cache_bytes=1 << 20).kv_bytes_per_token * 16


def test_sampling_depends_on_seed_and_step_only_not_on_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    temps, top_ps = [0.0, 0.7, 1.0, 1.3, 0.9, 1.0], [1.0, 0.9, 1.0, 0.5, 0.95, 0.3]
    seeds = [step_seed(s, k) for s, k in [(1, 0), (1, 1), (2, 0), (3, 7), (4, 2), (5, 5)]]
    together = sample(logits, temps, top_ps, seeds).tolist()
    alone = [sample(logits[i:i + 1], temps[i:i + 1], top_ps[i:i + 1], seeds[i:i + 1]).item() for i in range(6)]
    order = [5, 2, 0, 4, 1, 3]
    shuffled = sample(logits[order], [temps[i] for i in order], [top_ps[i] for i in order], [seeds[i] for i in order])
    assert together == alone == [together[i] for i in range(6)]
    assert [together[i] for i in order] == shuffled.tolist()
    assert together[0] == int(torch.argmax(logits[0]))


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    ids = sample(logits, [1.0] * 4000, [1.0] * 4000, [step_seed(9, k) for k in range(4000)])
    freq = torch.bincount(ids, minlength=4).float() / 4000
    assert (freq - probs).abs().max().item() < 0.03, freq
    nucleus = sample(logits, [1.0] * 4000, [0.7] * 4000, [step_seed(9, k) for k in range(4000)])
    assert set(nucleus.tolist()) == {0, 1}, "top_p 0.7 keeps the two tokens whose mass reaches it"


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_sampling_uniforms_are_the_documented_hash_of_seed_and_token() -> None:
    # A request resumed on another node (or by another version of the engine) samples what it would have only if
    # the uniforms stay this function of (step seed, token id): checked against the hash written out in plain
    # integers, for seeds that use all 63 bits.
    from sllm_actors.gpu.sampler import uniforms

    seeds = [0, 1, 2**32 - 1, 2**32, 2**63 - 1] + [step_seed(s, k) for s in (3, 12345) for k in (0, 7, 99)]
    got = uniforms(torch.tensor(seeds, dtype=torch.int64), 300)
    for row, seed in enumerate(seeds):
        lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
        # The top 24 bits plus a half, rounded to float32 as the device adds it, times 2**-24 (exact).
        expected = [_f32((_fmix32(_fmix32(((t * 0x9E3779B1) & 0xFFFFFFFF) ^ lo) ^ hi) >> 8) + 0.5) / (1 << 24)
                    for t in range(300)]
        assert got[row].tolist() == expected, f"seed {seed}"


def test_a_model_the_paged_attention_cannot_run_fails_at_load_with_the_reason() -> None:
    from transformers import AutoModelForCausalLM, Gemma2Config

    tokenizer = make_tokenizer()
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="Gemma2ForCausalLM cannot run on the engine's paged attention.*soft-capping"):
        Engine(model, tokenizer, kv_cache_bytes=1 << 20)
