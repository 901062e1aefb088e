"""A paired sweep of the placement policies on the simulator: every seed's workload under every policy.

    python benchmarks/sweep_policies.py [--cvs 1,2,4,8] [--seeds 5] [--out DIR] [--jobs N] [any `sllm simulate` option]

For each Gamma CV and seed, one workload is drawn and replayed under each policy (the pairing: the policies
differ in placement only). For each other policy it reports, per seed, the ratio other / serverlessllm of
latency p50, p99 and mean (> 1: serverlessllm is faster), their mean, min and max over the seeds, and whether
serverlessllm wins on every seed (every ratio > 1). Failed requests (queue timeouts) are counted beside.

The default cluster is chosen to make placement matter (issue 19): 4 servers x 2 GPUs of 80 GiB (640 GiB of
HBM), 96 models of the 7B/13B/30B mix (about 2.5 TB of checkpoints: the GPUs hold the family about 4 times
less than it weighs), 256 GB of DRAM and 2 TB of SSD a server (DRAM far smaller than the family), each
checkpoint on 2 servers' SSDs, DRAM 20 GB/s, SSD 2 GB/s and a 10 Gbit/s (1.25 GB/s) link to the model
repository, 8 requests an instance, keep-alive 30 s, 1.5 req/s for 600 s, prompts and outputs from the Azure
conv trace's lengths (clipped to 2048 / 512). Options after the defaults override them.

Writes ``sweep.json`` (per-run summaries and the ratio table) and, with matplotlib, ``sweep.png`` (ratios per
CV) to ``--out``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sllm_eval.simulator import POLICIES, build_parser, config_from_args, simulate, workload_from_args

DEFAULTS = ["--servers", "4", "--gpus-per-server", "2", "--gpu-memory", "80GiB", "--models", "96",
            "--dram", "256GB", "--ssd", "2TB", "--repository-bandwidth", "1.25GB", "--replicas", "2",
            "--concurrency", "8", "--keep-alive", "30", "--rps", "1.5", "--duration", "600",
            "--prompt-tokens", "azure-conv", "--output-tokens", "azure-conv"]
POINTS = ("p50", "p99", "mean")
BASE = "serverlessllm"


def _run(job: tuple[list[str], str]) -> dict[str, Any]:
    argv, policy = job
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    work = workload_from_args(args, cfg)
    summary = simulate(cfg, work, policy, seed=args.seed).summary()
    return {"cv": args.cv, "seed": args.seed, "policy": policy, "requests": summary["requests"],
            "failed": summary["failed"], "latency_s": summary["latency_s"], "ttft_s": summary["ttft_s"],
            "decisions": summary["decisions"], "migrations": summary["migrations"],
            "cold_starts": summary["cold_starts"]}


def ratios(runs: list[dict[str, Any]], cvs: list[float], seeds: list[int], others: list[str]) -> list[dict[str, Any]]:
    """Per (CV, other policy, point): per-seed other / serverlessllm, their mean, min, max, and the win."""
    by = {(r["cv"], r["seed"], r["policy"]): r for r in runs}
    rows = []
    for cv in cvs:
        for other in others:
            for point in POINTS:
                per_seed = []
                for seed in seeds:
                    ours = by[(cv, seed, BASE)]["latency_s"].get(point)
                    theirs = by[(cv, seed, other)]["latency_s"].get(point)
                    per_seed.append(theirs / ours if ours and theirs is not None else None)
                known = [x for x in per_seed if x is not None]
                rows.append({
                    "cv": cv, "other": other, "point": point, "per_seed": per_seed,
                    "mean": statistics.fmean(known) if known else None,
                    "min": min(known) if known else None, "max": max(known) if known else None,
                    "wins_every_seed": bool(known) and len(known) == len(per_seed) and min(known) > 1.0,
                    "failed": {BASE: sum(by[(cv, s, BASE)]["failed"] for s in seeds),
                               other: sum(by[(cv, s, other)]["failed"] for s in seeds)},
                })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| CV | other | point | per-seed other/sllm | mean | min | max | sllm wins every seed | failed sllm/other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = " ".join(f"{x:.2f}" if x is not None else "-" for x in r["per_seed"])
        f = r["failed"]
        fmt = (lambda v: f"{v:.2f}" if v is not None else "-")
        lines.append(f"| {r['cv']:g} | {r['other']} | {r['point']} | {seeds} | {fmt(r['mean'])} | {fmt(r['min'])} | "
                     f"{fmt(r['max'])} | {'yes' if r['wins_every_seed'] else 'no'} | "
                     f"{f[BASE]}/{f[r['other']]} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    others = sorted({r["other"] for r in rows})
    cvs = sorted({r["cv"] for r in rows})
    fig, axes = plt.subplots(1, len(POINTS), figsize=(5 * len(POINTS), 4), sharey=True)
    for ax, point in zip(axes, POINTS):
        for other in others:
            sel = [next(r for r in rows if r["cv"] == cv and r["other"] == other and r["point"] == point) for cv in cvs]
            means = [r["mean"] or 0.0 for r in sel]
            low = [m - (r["min"] or m) for m, r in zip(means, sel)]
            high = [(r["max"] or m) - m for m, r in zip(means, sel)]
            ax.errorbar(cvs, means, yerr=[low, high], marker="o", capsize=3, label=other)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("Gamma CV")
        ax.set_title(f"latency {point}: other / serverlessllm")
    axes[0].set_ylabel("ratio (mean, min-max over seeds)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cvs", default="1,2,4,8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--out", default="benchmarks/results/sweep_policies")
    parser.add_argument("--jobs", type=int, default=1)
    ours, rest = parser.parse_known_args(argv)
    cvs = [float(c) for c in ours.cvs.split(",")]
    seeds = list(range(ours.seeds))
    policies = ours.policies.split(",")
    if BASE not in policies:
        policies.insert(0, BASE)
    jobs = [([*DEFAULTS, *rest, "--cv", f"{cv:g}", "--seed", str(seed)], policy)
            for cv in cvs for seed in seeds for policy in policies]
    t0 = time.perf_counter()
    if ours.jobs > 1:
        with ProcessPoolExecutor(ours.jobs) as pool:
            runs = list(pool.map(_run, jobs))
    else:
        runs = [_run(job) for job in jobs]
    for r in runs:
        r["cv"] = float(r["cv"])
    rows = ratios(runs, cvs, seeds, [p for p in policies if p != BASE])
    out = Path(ours.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/sweep_policies.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "sweep.json").write_text(json.dumps({
        "command": command, "defaults": DEFAULTS, "cvs": cvs, "seeds": seeds, "policies": policies,
        "wall_s": time.perf_counter() - t0, "ratios": rows, "runs": runs}, indent=1))
    print(table(rows))
    print(f"\n{len(runs)} runs in {time.perf_counter() - t0:.0f} s; wrote {out / 'sweep.json'}"
          + (f" and {out / 'sweep.png'}" if plot(rows, out / "sweep.png") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
