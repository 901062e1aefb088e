"""The engine on a CUDA device: resumes continue exactly, and the calls that rebuild a cache return only once
the device has run them. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sllm_actors.gpu.engine import Engine
from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPT = "The capital of France is"
BUSY_CYCLES = 500_000_000
"""About a quarter of a second of GPU time: far longer than the rest of a call takes on the host."""


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model, "cuda:0")
    return Engine(model, tokenizer)


def _seq(engine: Engine, generated: list[int] | None = None, temperature: float = 0.0) -> Sequence:
    return Sequence("r", engine.tokenize(PROMPT, chat=False), list(generated or []),
                    SamplingParams(24, temperature, 0.9, 7))


def _run(engine: Engine, seq: Sequence) -> list[int]:
    engine.prefill(seq)
    while not seq.finish_reason:
        engine.step(seq)
    return seq.generated_ids


def _device_idle() -> bool:
    return torch.cuda.current_stream().query()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_resume_and_rounds_continue_identically_on_cuda(engine: Engine, temperature: float) -> None:
    full = _run(engine, _seq(engine, temperature=temperature))
    assert _run(engine, _seq(engine, full[:5], temperature)) == full
    seq = _seq(engine, full[:3], temperature)
    engine.prefill(seq)
    engine.extend(seq, full[3:9])
    while not seq.finish_reason:
        engine.step(seq)
    assert seq.generated_ids == full


def test_cache_rebuilding_calls_return_with_the_device_idle(engine: Engine) -> None:
    # A migration round reports its cache rebuilt when these return; on CUDA a return right after queueing let
    # the source stop while the destination's GPU was still computing, and the hand-over waited for it. A tiny
    # model's kernels finish as fast as Python launches them, so a hook queues a long kernel at the end of each
    # forward: what a 4k-token prefill's own work does on a real model.
    full = _run(engine, _seq(engine))
    seq = _seq(engine, full[:4])
    copied = _seq(engine, full[:8])
    handle = engine.model.register_forward_hook(lambda *_: torch.cuda._sleep(BUSY_CYCLES))
    try:
        torch.cuda.synchronize()
        engine.prefill(seq)
        assert _device_idle(), "prefill returned before its forward ran"
        engine.extend(seq, full[4:8])
        assert _device_idle(), "extend returned before its forward ran"
        n_cached, layers = engine.export_cache(seq)
        host_layers = [(k.cpu(), v.cpu()) for k, v in layers]
        engine.import_cache(copied, n_cached, host_layers)
        assert _device_idle(), "import_cache returned before its forward ran"
    finally:
        handle.remove()
    while not copied.finish_reason:
        engine.step(copied)
    assert copied.generated_ids == full


def _batch(engine: Engine, n: int, max_tokens: int) -> list[list[int]]:
    seqs = [Sequence(f"r{i}", engine.tokenize(PROMPT + " word" * (3 * i), chat=False), [],
                     SamplingParams(max_tokens, 0.0 if i % 2 == 0 else 0.8, 0.9, i)) for i in range(n)]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step_batch()
    return [s.generated_ids for s in seqs]


def test_decode_graphs_are_captured_and_replay_what_eager_computes(tiny_model: Path) -> None:
    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model, "cuda:0")
    graphs = Engine(model, tokenizer)
    eager = Engine(model, tokenizer, cuda_graphs=False)
    first = _batch(graphs, 8, 40)
    assert graphs.runner.graph_shapes, "a batch decoding for 40 steps gets its shapes captured"
    again = _batch(graphs, 8, 40)  # served by replays from the first token on
    assert first == again == _batch(eager, 8, 40)
    assert not eager.runner.graph_shapes


def test_sampling_uniforms_are_the_same_on_every_device() -> None:
    from sllm_actors.gpu.sampler import step_seed, uniforms

    seeds = torch.tensor([step_seed(s, k) for s in range(4) for k in range(8)], dtype=torch.int64)
    assert torch.equal(uniforms(seeds, 1000), uniforms(seeds.cuda(), 1000).cpu())
