"""The engine on a CUDA device: resumes continue exactly, and the calls that rebuild a cache return only once
the device has run them; engines sharing one device capture, decode and load side by side. Skipped without a
GPU."""

from __future__ import annotations

import threading
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


def _staggered(engine: Engine, n: int, max_tokens: int) -> list[list[int]]:
    """Half the requests start, decode a few steps, then the other half arrives: steps that decode and prefill."""
    seqs = [Sequence(f"s{i}", engine.tokenize(PROMPT + " word" * (5 * i + 1), chat=False), [],
                     SamplingParams(max_tokens, 0.0 if i % 2 == 0 else 0.8, 0.9, i)) for i in range(n)]
    for seq in seqs[:n // 2]:
        engine.add(seq)
    for _ in range(3):
        engine.step_batch()
    for seq in seqs[n // 2:]:
        engine.add(seq)
    while engine.has_work():
        engine.step_batch()
    return [s.generated_ids for s in seqs]


def test_prefill_graphs_are_captured_and_replay_what_their_eager_steps_compute(tiny_model: Path) -> None:
    # New prompts' prefill steps, padded to a shape, run eagerly once and are then captured: every round after
    # that replays graphs for its prefills (alone, and beside a decode graph), and gives the tokens the eager
    # padded rounds gave. Against the unpadded eager engine, the logits of a prompt agree to float tolerance.
    from sllm_actors.gpu.runner import Feed
    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model, "cuda:0")
    graphs = Engine(model, tokenizer, prefill_graphs=True)
    assert graphs.runner.pad_prefills
    rounds = [(_batch(graphs, 8, 12), _staggered(graphs, 8, 12)) for _ in range(4)]
    assert graphs.runner.prefill_graph_shapes, "prefill shapes served twice are captured"
    assert not graphs.runner.graphs.note, graphs.runner.graphs.note
    assert all(r == rounds[0] for r in rounds)

    plain = Engine(model, tokenizer, cuda_graphs=False)
    prompts = [graphs.tokenize(PROMPT + " word" * k, chat=False) for k in (0, 7, 20)]

    def prefill_logits(engine: Engine, graph_prefill: bool) -> torch.Tensor:
        tables: list[list[int]] = []
        for ids in prompts:
            table: list[int] = []
            assert engine.blocks.grow(table, len(ids))
            tables.append(table)
        feeds = [Feed(ids, 0, table, True) for ids, table in zip(prompts, tables)]
        with engine.gate.shared():
            out = engine.runner.execute(feeds, 0, graph_prefill=graph_prefill).float().cpu()
        for table in tables:
            engine.blocks.release(table)
        return out

    expected = prefill_logits(plain, False)
    got = [prefill_logits(graphs, True) for _ in range(3)]  # eager (padded) at first, then the captured shape
    assert all(torch.equal(g, got[0]) for g in got)
    assert torch.allclose(got[0], expected, atol=0.06, rtol=0.0), (got[0] - expected).abs().max()
    deterministic = Engine(model, tokenizer, prefill_graphs=True, deterministic=True)
    assert not deterministic.runner.pad_prefills, "deterministic mode never pads a prompt"


def test_sampling_uniforms_are_the_same_on_every_device() -> None:
    from sllm_actors.gpu.sampler import step_seed, uniforms

    seeds = torch.tensor([step_seed(s, k) for s in range(4) for k in range(8)], dtype=torch.int64)
    assert torch.equal(uniforms(seeds, 1000), uniforms(seeds.cuda(), 1000).cpu())


# ---------------------------------------------------------------- engines sharing one device (issue 21, item 1)


def _capture_hook(model: object, on_capture: object) -> object:
    """A forward hook that calls ``on_capture()`` once, from inside the first CUDA graph capture of ``model``."""
    fired = threading.Event()

    def hook(*_: object) -> None:
        if torch.cuda.is_current_stream_capturing() and not fired.is_set():
            fired.set()
            on_capture()  # type: ignore[operator]

    return model.register_forward_hook(hook)  # type: ignore[attr-defined]


def _run_thread(target: object, errors: list[BaseException]) -> threading.Thread:
    def body() -> None:
        try:
            target()  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - every failure of the thread is the test's failure
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_engines_on_one_device_decode_capture_and_load_side_by_side(tiny_model: Path) -> None:
    # Two instances in one node process on one GPU (what a resume or a scale-out on a node makes): one decodes
    # without pause while the other captures decode graphs (its shapes run twice eagerly first), and a load on the
    # same device is asked for in the middle of a capture. Before the device gate, the decoding engine crashed
    # ("operation not permitted when stream is capturing") and every later load failed on the generator.
    from sllm_actors.gpu.device_gate import device_gate
    from sllm_actors.models import load_for_inference

    model_a, tokenizer = load_for_inference(tiny_model, "cuda:0")
    model_b, _ = load_for_inference(tiny_model, "cuda:0")
    decoding, capturing = Engine(model_a, tokenizer), Engine(model_b, tokenizer)
    expected_a = _batch(Engine(model_a, tokenizer, cuda_graphs=False), 4, 24)
    expected_b = _batch(Engine(model_b, tokenizer, cuda_graphs=False), 8, 40)
    errors: list[BaseException] = []
    capture_started, capture_done, loaded = threading.Event(), threading.Event(), threading.Event()
    rounds_a: list[list[list[int]]] = []
    results_b: list[list[list[int]]] = []

    def decode() -> None:
        while not capture_done.is_set() or not rounds_a:
            rounds_a.append(_batch(decoding, 4, 24))

    def capture() -> None:
        try:
            results_b.append(_batch(capturing, 8, 40))
            results_b.append(_batch(capturing, 8, 40))
        finally:
            capture_done.set()

    def load() -> None:
        assert capture_started.wait(120), "the second engine never captured a graph"
        with device_gate("cuda:0").shared(long=True):  # as the node's instance holds it around a load
            model_c, tokenizer_c = load_for_inference(tiny_model, "cuda:0")
            Engine(model_c, tokenizer_c)
        loaded.set()

    handle = _capture_hook(model_b, capture_started.set)
    try:
        threads = [_run_thread(f, errors) for f in (decode, capture, load)]
        for thread in threads:
            thread.join(300)
    finally:
        handle.remove()
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert loaded.is_set()
    assert capturing.runner.graph_shapes and not capturing.runner.graphs.note
    assert results_b == [expected_b, expected_b]
    assert rounds_a and all(r == expected_a for r in rounds_a)
    # A third engine loads afterwards, and the device's default generator is sound.
    model_d, tokenizer_d = load_for_inference(tiny_model, "cuda:0")
    assert _batch(Engine(model_d, tokenizer_d), 8, 40) == expected_b
    torch.randn(4, device="cuda:0").sum().item()


def test_a_load_probe_during_another_engines_capture(tiny_model: Path) -> None:
    # The load's RMSNorm probe runs on another thread *while* a capture is open (no gate here: the probe itself
    # must not touch the device's shared generator, which the capture marks as capturing), and neither breaks.
    from sllm_actors.gpu.runner import fuse_rms_norms
    from sllm_actors.models import load_for_inference

    model_b, tokenizer = load_for_inference(tiny_model, "cuda:0")
    model_c, _ = load_for_inference(tiny_model, "cuda:0")
    expected = _batch(Engine(model_b, tokenizer, cuda_graphs=False), 8, 40)
    capturing = Engine(model_b, tokenizer)
    errors: list[BaseException] = []
    switched: list[int] = []

    def probe_meanwhile() -> None:
        thread = _run_thread(lambda: switched.append(fuse_rms_norms(model_c)), errors)
        thread.join(120)

    handle = _capture_hook(model_b, probe_meanwhile)
    try:
        assert _batch(capturing, 8, 40) == expected
    finally:
        handle.remove()
    assert not errors, errors
    assert switched and switched[0] > 0, "the probe ran and switched the norms"
    assert capturing.runner.graph_shapes and not capturing.runner.graphs.note, capturing.runner.graphs.note
    assert _batch(capturing, 8, 40) == expected
    model_d, tokenizer_d = load_for_inference(tiny_model, "cuda:0")
    assert _batch(Engine(model_d, tokenizer_d), 8, 40) == expected
    torch.randn(4, device="cuda:0").sum().item()
