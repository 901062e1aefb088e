"""Where a cold start's time goes on this machine, outside the cluster, in one warm process (imports and CUDA start
paid), on the checkpoint ``bench_coldstart.py`` writes.

    python benchmarks/trace_coldstart.py --work DIR [--device cuda] [--small] [--parts loader,engine,copy]
    python benchmarks/trace_coldstart.py --work DIR --parts first-step     (no checkpoint: a random model)

``loader``: the page-cache path (files warm): ``load_state_dict`` as shipped, then with one knob changed at a time
(no checksums, more or fewer threads, larger chunks, buffered reads, a busy Python thread beside it as the model
build is); ``load_model`` (the skeleton built while the weights read) as shipped and with a shorter GIL switch
interval; the DRAM path: the device allocation alone, the pinned copy alone, ``load_model`` from the host copy.
Ceiling in the same run: a page-cache read by 16 and 32 threads. Each figure is the best of ``--reps``; GB/s is over
the checkpoint's bytes.
``engine``: the engine's set-up on the loaded model (KV pool, norm check, warm-up), first and second time, then a
request's first token from the second engine, profiled, against later requests'.
``copy``: the engine's warm-up alone and while a tier copy of the checkpoint runs beside it.
``first-step``: first tokens from fresh engines on one model, request after request.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_coldstart as bench  # noqa: E402


def best_of(reps: int, fn: Callable[[], Any]) -> float:
    import torch

    times = []
    for _ in range(reps):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        del result
    return min(times)


def timed_engine(res: dict[str, Any], key: str, label: str, model: Any, tokenizer: Any) -> Any:
    """An engine on ``model`` (8 GiB pool), its set-up timed and recorded under ``key``."""
    from sllm_actors.gpu.engine import Engine

    started = time.perf_counter()
    engine = Engine(model, tokenizer, kv_cache_bytes=8 << 30)
    total = time.perf_counter() - started
    res[key] = {"total": total, **engine.setup_parts}
    bench.say(f"engine set-up, {label}: {total:.3f} s " + json.dumps({k: round(v, 4) for k, v in engine.setup_parts.items()}))
    return engine


def busy_python(stop: threading.Event) -> None:
    """Pure-Python work holding the GIL between its switch intervals, as a model's skeleton build does."""
    n = 0
    while not stop.is_set():
        n = (n * 31 + 7) % 1_000_003


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--parts", default="loader,engine,copy",
                   help="loader: the page-cache and DRAM paths; engine: its set-up and a first request, profiled; "
                        "copy: the engine's warm-up while a tier copy runs alongside")
    args = p.parse_args()
    todo = set(args.parts.split(","))
    device = "cuda:0" if args.device == "cuda" else args.device
    import torch

    from sllm_actors.storage import load_into_host, load_model, load_state_dict
    from sllm_actors.storage.loader import copy_host_to_device

    if todo == {"first-step"}:
        first_step(res := {"device": device}, device, args.small)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    ours, _, nbytes = bench.write_checkpoints(args.work, "small" if args.small else "8b")
    data = [f for f in bench.files_of(ours) if f.name.startswith("data_")]
    res: dict[str, Any] = {"bytes": nbytes, "device": device}
    timings: dict[str, float] = {}

    def record(key: str, seconds: float, note: str = "") -> None:
        res[key] = {"s": seconds, "gbs": nbytes / seconds / 1e9}
        bench.say(f"{key:44s} {seconds:7.3f} s  {nbytes / seconds / 1e9:6.1f} GB/s  {note}")

    def model_load(**kw: Any) -> Any:
        timings.clear()
        return load_model(ours, device, timings=timings, **kw)

    def shown() -> str:
        return json.dumps({k: round(v, 3) for k, v in timings.items()})

    if "loader" in todo:
        from sllm_eval.storage_bench import _read_files

        bench.warm_cache(data)
        record("ceiling: page-cache read, 16 threads", min(_read_files(data, direct=False, threads=16) for _ in range(2)))
        record("ceiling: page-cache read, 32 threads", min(_read_files(data, direct=False, threads=32) for _ in range(2)))
        variants: list[tuple[str, dict[str, Any]]] = [
            ("load_state_dict (as shipped)", {}),
            ("  no checksums", {"verify": False}),
            ("  32 threads", {"threads": 32}),
            ("  8 threads", {"threads": 8}),
            ("  64 MB chunks", {"chunk_bytes": 64 << 20}),
            ("  buffered reads (no mincore)", {"direct_io": False}),
        ]
        for label, kwargs in variants:
            bench.warm_cache(data)
            record(label, best_of(args.reps, lambda kw=kwargs: load_state_dict(ours, device, **kw)))
        stop = threading.Event()
        spinner = threading.Thread(target=busy_python, args=(stop,), daemon=True)
        spinner.start()
        try:
            record("  with a busy Python thread", best_of(args.reps, lambda: load_state_dict(ours, device)))
        finally:
            stop.set()
            spinner.join()
        record("load_model (build alongside)", best_of(args.reps, model_load), shown())
        res["load_model_parts"] = dict(timings)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        try:
            record("  switch interval 0.2 ms", best_of(args.reps, model_load), shown())
        finally:
            sys.setswitchinterval(interval)

    # ---- the DRAM path
    host = load_into_host(ours)
    res["host_pinned"] = bool(host.buffer.is_pinned()) if device.startswith("cuda") else False
    if "loader" in todo:
        if device.startswith("cuda"):
            record("device allocation alone", best_of(args.reps, lambda: torch.empty(nbytes, dtype=torch.uint8,
                                                                                       device=device)))
            record("pinned host copy -> device (copy_host_to_device)",
                   best_of(args.reps, lambda: copy_host_to_device(host.buffer, device)))
        record("load_model from the host copy", best_of(args.reps, lambda: model_load(host=host)), shown())
        res["load_model_host_parts"] = dict(timings)
    if "engine" in todo:
        engine_probe(res, model_load(host=host))
    if "copy" in todo:
        warm_up_beside_a_copy(args, res, lambda: model_load(host=host), ours)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


def engine_probe(res: dict[str, Any], model: Any) -> None:
    """The engine's set-up on a loaded model, first and second time; then a request's first token from the second
    engine, profiled, against a second request's."""
    import cProfile
    import io
    import pstats

    from sllm_actors.gpu.sequence import Sequence
    from sllm_actors.messages import SamplingParams
    from sllm_eval.tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    engine = None
    for attempt in ("first", "second"):
        engine = None
        gc.collect()
        engine = timed_engine(res, f"engine_{attempt}", f"{attempt} time", model, tokenizer)
    assert engine is not None
    ids = tokenizer(bench.PROMPT)["input_ids"]
    for which in ("first request", "second request", "third request"):
        seq = Sequence(which, list(ids), [], SamplingParams(2, seed=0))
        profiler = cProfile.Profile() if which == "first request" else None
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        engine.add(seq)
        while not seq.generated_ids:
            engine.step_batch()
        if profiler is not None:
            profiler.disable()
        took = time.perf_counter() - started
        res[f"engine_{which.replace(' ', '_')}_s"] = took
        bench.say(f"engine: {which}'s first token in {took:.4f} s")
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
            print(out.getvalue()[-6000:], flush=True)
        while engine.has_work():
            engine.step_batch()


def first_step(res: dict[str, Any], device: str, small: bool) -> None:
    """First tokens from just-made engines on a model that ran before (so no warm-up), each engine on fresh pool
    memory (as after an unload), three requests each, each request's prompt longer than the last (new shapes).
    A random model made on the device (no checkpoint: this part needs none).

    On the H200 (2026-12-02) the first engine's requests took 0.08-0.13 s and every later engine's 0.02 s, whether
    or not its pool was written whole first: the cost is neither fresh pool memory nor Python (a profile puts it in
    the attention and matmul calls)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sllm_actors.gpu.engine import Engine
    from sllm_actors.gpu.sequence import Sequence
    from sllm_actors.messages import SamplingParams
    from sllm_eval.tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    config = LlamaConfig(**bench.SHAPES["small" if small else "8b"], max_position_embeddings=8192,
                         tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    ids = tokenizer(bench.PROMPT)["input_ids"]
    Engine(model, tokenizer, kv_cache_bytes=8 << 30)  # the warm-up, once
    for n in range(4):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # fresh device memory for the pool, as after an unload
        engine = Engine(model, tokenizer, kv_cache_bytes=8 << 30)
        times = []
        for which in range(3):
            seq = Sequence(f"r{which}", list(ids) * (1 + which), [], SamplingParams(2, seed=0))
            started = time.perf_counter()
            engine.add(seq)
            while not seq.generated_ids:
                engine.step_batch()
            times.append(time.perf_counter() - started)
            while engine.has_work():
                engine.step_batch()
        res.setdefault("first_tokens_s", []).append(times)
        bench.say(f"engine {n + 1}: first tokens of requests 1-3 " + ", ".join(f"{t:.4f}" for t in times))
        del engine


def warm_up_beside_a_copy(args: Any, res: dict[str, Any], load: Callable[[], Any], ours: Path) -> None:
    """The engine's warm-up (forced) alone, then while the SSD tier's copy of the checkpoint runs alongside, as it
    does behind a repository cold start."""
    import shutil

    from sllm_actors.gpu.engine import forget_warm_ups
    from sllm_actors.storage import copy_checkpoint
    from sllm_eval.tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    dest = args.work / "copy-beside"
    for label in ("alone", "beside a copy"):
        forget_warm_ups()
        model = load()
        copying = None
        if label == "beside a copy":
            shutil.rmtree(dest, ignore_errors=True)
            copying = threading.Thread(target=copy_checkpoint, args=(ours, dest), daemon=True)
            copying.start()
            time.sleep(2.0)  # a benchmark, not a test: let the copy reach its steady state
        engine = timed_engine(res, f"warmup_{label.replace(' ', '_')}", f"with its warm-up, {label}", model,
                              tokenizer)
        del engine, model
        if copying is not None:
            copying.join()
            shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
