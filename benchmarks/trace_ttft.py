"""Where the first token's time goes under concurrent arrivals: per-hop timestamps of every request through the
real cluster (client → router → scheduler → router → node → instance → engine → router → client), with the
rounds' throughput, repeated for the spread.

    python benchmarks/trace_ttft.py [--device cuda:0] [--concurrency 1,32,256] [--runs 3] [--tokens 128]
        [--prompt-words 48] [--model DIR] [--dtype bfloat16] [--generate] [--json out.json]

The cluster runs with ``SLLM_TRACE`` set (:mod:`sllm_actors.runtime.trace`): each process appends each request's
hops to a file of its own, merged after every round. For each concurrency N: one unmeasured round (CUDA graphs
for its shapes are captured there), then ``--runs`` measured rounds of N clients sending a prompt at once (as
``bench_serving.py`` does). Per round: output tok/s, TTFT p50/p99, and per hop the time from the previous hop,
p50 and p99 over the round's requests (a hop's p99 and the next one's need not come from the same request).
Then, per N, the median over runs and the spread (min..max). ``--generate``: transformers' batched ``generate``
at batch N on the same weights, after the cluster (the in-run baseline, repeated ``--runs`` times).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_serving  # benchmarks/ is not a package: its helpers are shared by path

from sllm_actors.runtime import trace


def run_round(endpoint: str, model: str, tag: str, n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    return bench_serving.client_records(endpoint, model, n, args.prompt_words, args.tokens, tag=tag)


def summarise(records: list[dict[str, Any]], hops: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The round's throughput and TTFT, and per hop the time since the previous hop the request passed."""
    pct = bench_serving.percentile
    done = [r for r in records if not r["error"] and "first" in r and "end" in r]
    errors = [r["error"] for r in records if r["error"]]
    t0 = min((r["start"] for r in done), default=0.0)
    t1 = max((r["end"] for r in done), default=0.0)
    total = sum(r["tokens"] for r in done)
    ttft = [r["first"] - r["start"] for r in done]
    gaps: dict[str, list[float]] = {hop: [] for hop in trace.HOPS[1:]}
    for r in done:
        times = {**hops.get(r["id"], {}), "client_send": r["start"], "client_token": r["first"]}
        previous = None
        for hop in trace.HOPS:
            if hop not in times:
                continue
            if previous is not None:
                gaps[hop].append(times[hop] - previous)
            previous = times[hop]
    return {
        "streams": len(records), "completed": len(done), "n_errors": len(errors), "errors": errors[:3],
        "tokens": total, "wall_s": t1 - t0, "total_tok_s": total / (t1 - t0) if t1 > t0 else 0.0,
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
        "hops": {hop: {"n": len(v), "p50_s": pct(v, 0.5), "p99_s": pct(v, 0.99), "mean_s": statistics.fmean(v)}
                 for hop, v in gaps.items() if v},
    }


def print_round(label: str, res: dict[str, Any]) -> None:
    print(f"[{label}] {res['streams']:4d} streams: {res['total_tok_s']:9.1f} tok/s, TTFT p50 "
          f"{res['ttft_p50_s'] * 1e3:7.1f} ms p99 {res['ttft_p99_s'] * 1e3:7.1f} ms ({res['completed']} done"
          f"{', errors: ' + str(res['errors']) if res['errors'] else ''})", flush=True)
    print(f"    {'hop (time since the previous)':32s} {'p50 ms':>9s} {'p99 ms':>9s} {'mean ms':>9s}")
    for hop, h in res["hops"].items():
        print(f"    {hop:32s} {h['p50_s'] * 1e3:9.2f} {h['p99_s'] * 1e3:9.2f} {h['mean_s'] * 1e3:9.2f}")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}..{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", default="1,32,256")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=48, help="~64 tokens with SmolLM2's tokenizer")
    parser.add_argument("--model", default="")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--kv-cache", default="")
    parser.add_argument("--generate", action="store_true", help="transformers' generate at batch N, --runs times")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the cluster's processes "
                        "(e.g. SLLM_OUTPUT_THREAD=0: text on the step thread, as before)")
    parser.add_argument("--profile", default="", help="DIR: py-spy stacks of the controller and the node during "
                        "each N's first measured round (py-spy on PATH; it perturbs that round's timings)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not args.kv_cache:
        args.kv_cache = "8GiB" if args.device != "cpu" else "1GiB"
    from sllm_actors.models import sllm_home
    from sllm_eval.replay import start_cluster, stop_cluster

    levels = [int(x) for x in args.concurrency.split(",") if x]
    model_dir = Path(args.model) if args.model else sllm_home() / "models" / "smollm2-135m"
    report: dict[str, Any] = {"command": " ".join(sys.argv), "machine": platform.node(), "device": args.device,
                              "tokens": args.tokens, "model": str(model_dir), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "rounds": []}
    if args.device.startswith("cuda"):
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="trace-ttft-"))
    trace_dir = work / "trace"
    topo = bench_serving.topology(work / "topology.yaml", model_dir, args.device, max(levels), args.dtype, False,
                                  args.kv_cache)
    env = dict(item.split("=", 1) for item in args.env)
    report["env"] = env
    cluster = start_cluster(topo, env={**env, trace.ENV: str(trace_dir)}, timeout=600)
    try:
        cold = summarise(run_round(cluster.endpoint, "bench", "cold", 1, args), {})
        print(f"cold start: first token after {cold['ttft_p50_s']:.3f}s", flush=True)
        for n in levels:
            run_round(cluster.endpoint, "bench", f"warm{n}", n, args)  # captures this round's shapes
            for run in range(args.runs):
                tag = f"n{n}r{run}"
                spies = bench_serving.profile_start(cluster, f"trace-{n}", args.profile) \
                    if args.profile and run == 0 else []
                records = run_round(cluster.endpoint, "bench", tag, n, args)
                for spy in spies:
                    spy.wait(60)
                res = summarise(records, trace.read(trace_dir, prefix=f"{tag}-"))
                res["run"] = run
                report["rounds"].append(res)
                print_round(f"run {run}", res)
    finally:
        stop_cluster(cluster)
    if args.generate:
        report["generate"] = []
        for run in range(args.runs):
            for base in bench_serving.generate_baseline(model_dir, args.device, levels, args):
                report["generate"].append({**base, "run": run})
    print("\nstreams | tok/s median (min..max) | TTFT p50 ms | TTFT p99 ms | generate tok/s | ratio")
    for n in levels:
        rounds = [r for r in report["rounds"] if r["streams"] == n]
        base = [g["tok_s"] for g in report.get("generate", []) if g["batch"] == n]
        tok = [r["total_tok_s"] for r in rounds]
        line = (f"{n:7d} | {spread(tok):23s} | {spread([r['ttft_p50_s'] * 1e3 for r in rounds]):11s} | "
                f"{spread([r['ttft_p99_s'] * 1e3 for r in rounds]):11s}")
        if base:
            line += f" | {spread(base)} | {statistics.median(tok) / statistics.median(base):.2f}"
        print(line)
        print("        per hop, p50 ms median over runs (min..max):")
        for hop in trace.HOPS[1:]:
            values = [r["hops"][hop]["p50_s"] * 1e3 for r in rounds if hop in r["hops"]]
            p99 = [r["hops"][hop]["p99_s"] * 1e3 for r in rounds if hop in r["hops"]]
            if values:
                print(f"          {hop:16s} p50 {spread(values):24s} p99 {spread(p99)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
