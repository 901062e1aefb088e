"""The five placement policies on a simulated cluster of 1000 GPUs (the scheduler's own placement code).

    python benchmarks/bench_simulate.py [--json out.json] [any `sllm simulate` option]

Defaults: 250 servers x 4 GPUs (80 GiB), 1000 models (half 7B, 30 % 13B, 20 % 30B), 50 req/s of
per-model Gamma arrivals (CV 2, Zipf s = 1) for 600 s, prompt and output lengths drawn from the Azure
conv trace (clipped to 2048 / 512), each checkpoint on the SSD of 2 servers; DRAM 20 GB/s, SSD 2 GB/s,
repository 0.5 GB/s; seed 0. Prints the comparison table (latency and TTFT in seconds), then the
simulator's wall and CPU time per policy. Options after the defaults override them, e.g.
``--rps 100 --cv 4`` or ``--trace azure-conv``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sllm_eval.simulator import (
    POLICIES,
    build_parser,
    config_from_args,
    format_table,
    simulate,
    workload_from_args,
)

DEFAULTS = ["--servers", "250", "--gpus-per-server", "4", "--models", "1000", "--rps", "50", "--cv", "2",
            "--duration", "600", "--seed", "0", "--prompt-tokens", "azure-conv", "--output-tokens", "azure-conv"]


def _one(job: tuple) -> dict:  # type: ignore[type-arg]
    cfg, work, policy, seed = job
    cpu0 = time.process_time()
    summary = simulate(cfg, work, policy, seed).summary()
    summary["cpu_s"] = time.process_time() - cpu0
    return summary


def markdown(summaries: list[dict]) -> str:  # type: ignore[type-arg]
    head = ("| policy | done | failed | latency mean / p50 / p99 (s) | TTFT p50 / p99 (s) | cold starts dram / ssd / "
            "repo | migrations | preemptions | GPU busy (GPU-h) |")
    lines = [head, "|" + "---|" * 9]
    for s in summaries:
        lat, ttft, cold = s["latency_s"], s["ttft_s"], s["cold_starts"]
        lines.append(
            f"| {s['policy']} | {s['completed']} | {s['failed']} | {lat['mean']:.2f} / {lat['p50']:.2f} / "
            f"{lat['p99']:.2f} | {ttft['p50']:.2f} / {ttft['p99']:.2f} | {cold['dram']} / {cold['ssd']} / "
            f"{cold['repository']} | {s['migrations']} | {s['preemptions']} | {s['gpu_busy_s'] / 3600:.1f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = build_parser()
    parser.prog = "bench_simulate.py"
    args = parser.parse_args(DEFAULTS + argv)
    if "--jobs" not in argv:
        args.jobs = min(len(POLICIES), os.cpu_count() or 1)
    policies = list(POLICIES) if args.policy == "all" else args.policy.split(",")
    t0 = time.perf_counter()
    cfg = config_from_args(args)
    work = workload_from_args(args, cfg)
    setup_s = time.perf_counter() - t0
    print(f"# {len(cfg.servers)} servers x {len(cfg.servers[0].gpu_memory)} GPUs = {cfg.gpu_count} GPUs, "
          f"{len(cfg.models)} models, {len(work)} requests over {args.duration:.0f} s "
          f"({len(work) / args.duration:.1f} req/s, trace {args.trace}, cv {args.cv}), seed {args.seed}; "
          f"{args.jobs} processes on {os.cpu_count()} cores, Python {platform.python_version()}", flush=True)
    jobs = [(cfg, work, p, args.seed) for p in policies]
    t1 = time.perf_counter()
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            summaries = list(pool.map(_one, jobs))
    else:
        summaries = [_one(j) for j in jobs]
    total = time.perf_counter() - t1
    print(format_table(summaries))
    print()
    print(markdown(summaries))
    print()
    for s in summaries:
        print(f"{s['policy']}: {s['wall_s']:.1f} s wall, {s['cpu_s']:.1f} s CPU, {s['events']} events, "
              f"decisions {s['decisions']}, loads {s['loads']}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if args.jobs > 1 else resource.RUSAGE_SELF).ru_maxrss
    print(f"workload {setup_s:.1f} s; simulations {total:.1f} s wall in all; peak RSS {peak / 1024:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"argv": DEFAULTS + argv, "gpus": cfg.gpu_count, "requests": len(work),
                                         "total_wall_s": total, "results": summaries}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
