"""Serving throughput through the real cluster (client → router → instance → client), against transformers'
batched ``generate`` on the same weights in the same run.

    python benchmarks/bench_serving.py [--device cuda:0] [--concurrency 1,8,32,128,256] [--tokens 128]
        [--prompt-tokens 64] [--model DIR] [--dtype bfloat16] [--deterministic-at 32] [--eager-at 1,32]
        [--llama8b DIR] [--json out.json]

For each concurrency N: N clients (spread over a few processes, each client its own ZeroMQ socket) send a
~``prompt-tokens`` prompt at once and stream ``tokens`` tokens back; one unmeasured round first, so CUDA graphs
for the round's shapes are captured before the measured one (the first round's cold start is reported apart).
Reported: total output tok/s (all tokens / wall time of the round), per-stream tok/s (median over streams of
tokens after the first / time after the first), TTFT p50/p99. Baseline: ``model.generate`` at batch N on the
same checkpoint (left-padded prompts, exactly ``tokens`` new tokens, greedy), timed after one warm-up call.

``--deterministic-at N``: the same round with the model's ``deterministic: true`` (its cost). ``--eager-at``:
rounds with CUDA graphs off (``SLLM_CUDA_GRAPHS=0``). ``--llama8b DIR``: a random-weight 8B Llama-shape bf16
checkpoint (written to DIR if missing), one stream, against the HBM bound (measured device-to-device copy
bandwidth / weight bytes).

The default model is ``$SLLM_HOME/models/smollm2-135m`` (random weights on the GPU machine, see
benchmarks/device/random_default_model.py; the real SmolLM2-135M-Instruct after ``make model``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WORDS = ("river stone cloud lamp garden music paper window orange silver thunder pocket candle forest "
         "harbor ladder mirror planet rocket saddle tunnel velvet whistle anchor basket copper desert").split()
CLIENT_PROCS = 8


def prompt(i: int, n_words: int) -> str:
    rng = random.Random(i)
    return f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------- the load generator


def _client_proc(endpoint: str, model: str, tag: str, indexes: list[int], n_words: int, tokens: int,
                 start_at: Any, ready: Any, out: Any) -> None:
    from sllm_actors.client import Client, Completion, TokenEvent

    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        # ``tag``: request ids ``TAG-i`` of the caller's choosing (the trace finds each request's hops by them).
        record: dict[str, Any] = {"i": i, "id": f"{tag}-{i}" if tag else "", "tokens": 0, "error": ""}
        try:
            with Client(endpoint) as client:
                client.connect()  # a connected client: the TTFT is the request's, not the CURVE handshake's
                barrier.wait()
                while time.time() < start_at.value:
                    time.sleep(0.0005)  # a start line shared with other processes: spin briefly to it
                record["start"] = time.time()
                for event in client.generate(model, prompt(i, n_words), max_tokens=tokens,
                                             request_id=record["id"] or None):
                    if isinstance(event, TokenEvent):
                        if record["tokens"] == 0:
                            record["first"] = time.time()
                        record["tokens"] += len(event.token_ids)
                    elif isinstance(event, Completion):
                        record["end"] = time.time()
        except Exception as exc:  # reported in the results
            record["error"] = f"{type(exc).__name__}: {exc}"
        with lock:
            results.append(record)

    barrier = threading.Barrier(len(indexes) + 1)
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in indexes]
    for t in threads:
        t.start()
    barrier.wait()
    ready.release()
    for t in threads:
        t.join()
    out.put(results)


def client_records(endpoint: str, model: str, n: int, n_words: int, tokens: int, tag: str = "") -> list[dict[str, Any]]:
    """``n`` streams sent at once from a few client processes, each client connected before the start line; one
    record per stream (``start``, ``first``, ``end`` wall times, ``tokens``, ``error``)."""
    ctx = mp.get_context("spawn")
    # Client processes take cores from the server: on a 2-core VM one process holds every stream.
    procs_n = max(1, min(CLIENT_PROCS, n, (os.cpu_count() or 2) // 2))
    start_at = ctx.Value("d", 0.0)
    ready = ctx.Semaphore(0)
    out = ctx.Queue()
    procs = [ctx.Process(target=_client_proc, args=(endpoint, model, tag, list(range(p, n, procs_n)), n_words, tokens,
                                                    start_at, ready, out), daemon=True) for p in range(procs_n)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire(timeout=120)
    start_at.value = time.time() + 0.2
    records: list[dict[str, Any]] = []
    for _ in procs:
        records.extend(out.get(timeout=1800))
    for p in procs:
        p.join(30)
    return records


def run_round(endpoint: str, model: str, n: int, n_words: int, tokens: int) -> dict[str, Any]:
    records = client_records(endpoint, model, n, n_words, tokens)
    errors = [r["error"] for r in records if r["error"]]
    done = [r for r in records if not r["error"] and "first" in r and "end" in r]
    t0 = min(r["start"] for r in done) if done else 0.0
    t1 = max(r["end"] for r in done) if done else 0.0
    total = sum(r["tokens"] for r in done)
    per_stream = [(r["tokens"] - 1) / (r["end"] - r["first"]) for r in done if r["tokens"] > 1 and r["end"] > r["first"]]
    ttft = [r["first"] - r["start"] for r in done]
    return {
        "streams": n, "completed": len(done), "errors": errors[:3], "n_errors": len(errors), "tokens": total,
        "wall_s": t1 - t0, "total_tok_s": total / (t1 - t0) if t1 > t0 else 0.0,
        "per_stream_tok_s": statistics.median(per_stream) if per_stream else 0.0,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
    }


# ---------------------------------------------------------------------------- the cluster


def topology(path: Path, model_dir: Path, device: str, max_n: int, dtype: str, deterministic: bool,
             kv_cache: str) -> Path:
    model: dict[str, Any] = {"name": "bench", "source": str(model_dir), "keep_alive": "1h",
                             "target_concurrency": max_n, "max_batch": max(max_n, 1), "max_instances": 1,
                             "deterministic": deterministic, "kv_cache": kv_cache}
    if dtype:
        model["dtype"] = dtype
    data = {
        "controller": {"host": "127.0.0.1", "client_port": 0, "cluster_port": 0, "state_port": 0, "http_port": 0},
        "nodes": [{"name": "node-1", "gpus": [{"device": device, "memory": "120GiB" if device != "cpu" else "8GiB"}],
                   "dram": {"capacity": "40GiB" if device != "cpu" else "2GiB"},
                   "ssd": {"path": str(path.parent / "ssd"), "capacity": "60GiB"}}],
        "models": [model],
        "scheduler": {"migration": False},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def serve(model_dir: Path, device: str, levels: list[int], args: argparse.Namespace, *, deterministic: bool = False,
          env: dict[str, str] | None = None, label: str = "ours") -> dict[str, Any]:
    from sllm_eval.replay import start_cluster, stop_cluster

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    topo = topology(work / "topology.yaml", model_dir, device, max(levels), args.dtype, deterministic, args.kv_cache)
    cluster = start_cluster(topo, env=env, timeout=600)
    out: dict[str, Any] = {"label": label, "rounds": []}
    try:
        cold = run_round(cluster.endpoint, "bench", 1, args.prompt_words, 8)
        out["cold_start_ttft_s"] = cold["ttft_p50_s"]
        print(f"[{label}] cold start: first token after {cold['ttft_p50_s']:.3f}s", flush=True)
        for n in levels:
            run_round(cluster.endpoint, "bench", n, args.prompt_words, args.tokens)  # captures this round's shapes
            spies = profile_start(cluster, f"{label}-{n}", args.profile) if args.profile else []
            result = run_round(cluster.endpoint, "bench", n, args.prompt_words, args.tokens)
            for spy in spies:
                spy.wait(60)
            out["rounds"].append(result)
            print(f"[{label}] {n:4d} streams: {result['total_tok_s']:9.1f} tok/s total, "
                  f"{result['per_stream_tok_s']:7.1f} tok/s per stream, TTFT p50 {result['ttft_p50_s']*1e3:7.1f} ms "
                  f"p99 {result['ttft_p99_s']*1e3:7.1f} ms ({result['completed']}/{n} done, {result['tokens']} tokens"
                  f"{', errors: ' + str(result['errors']) if result['errors'] else ''})", flush=True)
    finally:
        stop_cluster(cluster)
    return out


def profile_start(cluster: Any, name: str, out_dir: str) -> list[Any]:
    """py-spy on the controller and the node for the measured round (``--profile DIR``; it perturbs timings)."""
    import subprocess

    from sllm_actors.client import Client

    with Client(cluster.endpoint) as client:
        pids = {"controller": cluster.proc.pid, **{n["name"]: n["pid"] for n in client.status()["nodes"] if n["alive"]}}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", "5", "-r", "200", "-f", "raw", "--threads",
                              "-o", str(Path(out_dir) / f"{name}-{who}.txt")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for who, pid in pids.items()]


# ---------------------------------------------------------------------------- the baseline


def generate_baseline(model_dir: Path, device: str, levels: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(model_dir, device)
    if args.dtype:
        model = model.to(getattr(torch, args.dtype))
    elif device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for n in levels:
        batch = tokenizer([prompt(i, args.prompt_words) for i in range(n)], return_tensors="pt", padding=True).to(device)

        def run() -> float:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - started

        run()
        seconds = run()
        result = {"batch": n, "seconds": seconds, "tok_s": n * args.tokens / seconds}
        out.append(result)
        print(f"[generate] batch {n:4d}: {result['tok_s']:9.1f} tok/s", flush=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------- 8B at one stream


def make_llama8b(dest: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sllm_actors.storage import save_checkpoint

    if (dest / "index.json").is_file():
        return dest
    # SmolLM2's tokenizer (the only one on the GPU machine) has 49,152 tokens; Llama-3's 128,256 would add 0.65 GB.
    config = LlamaConfig(vocab_size=49152, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    kit = Path(os.environ.get("SLLM_DEVICE_KIT", ".gpu")) / "smol"
    tokenizer = AutoTokenizer.from_pretrained(kit if kit.is_dir() else REPO / ".gpu" / "smol")
    save_checkpoint(model.cpu(), dest, tokenizer=tokenizer)
    del model
    torch.cuda.empty_cache()
    return dest


def hbm_bandwidth() -> float:
    import torch

    x = torch.empty(4 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * 4 * 1024**3 / seconds  # read + write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", default="1,8,32,128,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=48, help="~64 tokens with SmolLM2's tokenizer")
    parser.add_argument("--model", default="")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--kv-cache", default="")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--deterministic-at", default="")
    parser.add_argument("--eager-at", default="")
    parser.add_argument("--llama8b", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--profile", default="", help="DIR: py-spy stacks of the controller and node per round")
    args = parser.parse_args()
    if not args.kv_cache:
        args.kv_cache = "8GiB" if args.device != "cpu" else "1GiB"
    from sllm_actors.models import sllm_home

    levels = [int(x) for x in args.concurrency.split(",") if x]
    report: dict[str, Any] = {"command": " ".join(sys.argv), "machine": platform.node(), "device": args.device,
                              "tokens": args.tokens, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.device.startswith("cuda"):
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    if args.llama8b:
        dest = make_llama8b(Path(args.llama8b))
        bw = hbm_bandwidth()
        weight_bytes = sum(f.stat().st_size for f in dest.glob("data_*.bin"))
        bound = bw / weight_bytes
        args.dtype = args.dtype or "bfloat16"
        ours = serve(dest, args.device, [1], args, label="8b")
        tok_s = ours["rounds"][0]["per_stream_tok_s"]
        report["llama8b"] = {"hbm_bytes_s": bw, "weight_bytes": weight_bytes, "bound_tok_s": bound,
                             "ours": ours, "share_of_bound": tok_s / bound}
        print(f"[8b] HBM {bw / 1e12:.2f} TB/s, weights {weight_bytes / 1e9:.1f} GB: bound {bound:.0f} tok/s; ours "
              f"{tok_s:.1f} tok/s per stream = {100 * tok_s / bound:.0f} % of it", flush=True)
    else:
        model_dir = Path(args.model) if args.model else sllm_home() / "models" / "smollm2-135m"
        report["model"] = str(model_dir)
        report["ours"] = serve(model_dir, args.device, levels, args)
        for n in [int(x) for x in args.eager_at.split(",") if x]:
            report.setdefault("eager", []).append(serve(model_dir, args.device, [n], args, env={"SLLM_CUDA_GRAPHS": "0"},
                                                        label="eager"))
        for n in [int(x) for x in args.deterministic_at.split(",") if x]:
            report.setdefault("deterministic", []).append(serve(model_dir, args.device, [n], args,
                                                                deterministic=True, label="deterministic"))
        if not args.no_baseline:
            report["generate"] = generate_baseline(model_dir, args.device, levels, args)
            print("\nstreams | ours tok/s | generate tok/s | ratio | per-stream tok/s | TTFT p50 / p99 ms")
            for ours, base in zip(report["ours"]["rounds"], report["generate"]):
                print(f"{ours['streams']:7d} | {ours['total_tok_s']:10.1f} | {base['tok_s']:14.1f} | "
                      f"{ours['total_tok_s'] / base['tok_s']:5.2f} | {ours['per_stream_tok_s']:16.1f} | "
                      f"{ours['ttft_p50_s'] * 1e3:.1f} / {ours['ttft_p99_s'] * 1e3:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
