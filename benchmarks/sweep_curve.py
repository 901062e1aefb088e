"""Latency against request rate on the simulator, with a GPU replay's cluster and costs (issue 19's curve).

    python benchmarks/sweep_curve.py REPLAY.json [--cvs 2,8] [--rps 0.5,1,1.5,2,3,4] [--seeds 3] [--duration 300]
        [--policies serverlessllm,random,rayserve] [--out DIR]

REPLAY.json is one run of ``sllm bench replay --json`` (e.g. a per-seed JSON of ``run_replay_sweep.sh``): its
topology, family and measured costs (``sim_validate.derive_calibration``, pooled over its policies, so every policy
is simulated on the same machine costs) make the simulated cluster; each (CV, rate, seed) draws one Gamma workload
over the replay's family and replays it under every policy (paired). Writes ``curve.json`` and ``curve.png`` to
``--out`` and prints the per-point ratios other / serverlessllm (their mean over seeds and the minimum).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sllm_eval.replay import build_workload
from sllm_eval.sim_validate import derive_calibration, load_replay, replay_config
from sllm_eval.simulator import simulate

BASE = "serverlessllm"


def run(replay_path: Path, cvs: list[float], rates: list[float], seeds: int, duration: float,
        policies: list[str]) -> list[dict[str, Any]]:
    replay = load_replay(replay_path)
    cfg = replay_config(replay, derive_calibration(replay))
    names = [f["name"] for f in replay["family"]]
    rows = []
    for cv in cvs:
        for rps in rates:
            for seed in range(seeds):
                work = build_workload("gamma", models=names, rps=rps, cv=cv, duration_s=duration, seed=seed,
                                      prompt_range=(16, 128), output_range=(8, 32))
                row: dict[str, Any] = {"cv": cv, "rps": rps, "seed": seed, "requests": len(work)}
                for p in policies:
                    s = simulate(cfg, work, p, seed).summary()
                    row[p] = {**s["latency_s"], "failed": s["failed"], "migrations": s["migrations"]}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]], policies: list[str]) -> str:
    others = [p for p in policies if p != BASE]
    lines = [f"| CV | req/s | {BASE} mean / p99 s | " + " | ".join(f"{p} / {BASE}: mean, p99" for p in others) + " |",
             "|---|---|---|" + "---|" * len(others)]
    for cv, rps in sorted({(r["cv"], r["rps"]) for r in rows}):
        sel = [r for r in rows if r["cv"] == cv and r["rps"] == rps]
        mean, p99 = (statistics.mean(r[BASE][k] for r in sel) for k in ("mean", "p99"))
        cells = []
        for p in others:
            def ratio(k: str, sel: list[dict[str, Any]] = sel, p: str = p) -> str:
                values = [r[p][k] / r[BASE][k] for r in sel]
                return f"{statistics.mean(values):.2f} (min {min(values):.2f})"
            cells.append(f"{ratio('mean')}, {ratio('p99')}")
        lines.append(f"| {cv:g} | {rps:g} | {mean:.2f} / {p99:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], policies: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cvs = sorted({r["cv"] for r in rows})
    fig, axes = plt.subplots(1, 2 * len(cvs), figsize=(9 * len(cvs), 4), squeeze=False)
    for ci, cv in enumerate(cvs):
        rates = sorted({r["rps"] for r in rows if r["cv"] == cv})
        for pi, point in enumerate(("mean", "p99")):
            ax = axes[0][2 * ci + pi]
            for p in policies:
                ax.plot(rates, [statistics.mean(r[p][point] for r in rows if r["cv"] == cv and r["rps"] == x)
                                for x in rates], marker="o", label=p)
            ax.set_title(f"CV {cv:g}: latency {point}")
            ax.set_xlabel("requests/s")
            ax.set_ylabel("s")
            ax.grid(alpha=0.3)
            if ci == 0 and pi == 0:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("replay", type=Path)
    p.add_argument("--cvs", default="2,8")
    p.add_argument("--rps", default="0.5,1,1.5,2,3,4")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--policies", default="serverlessllm,random,rayserve")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep_curve"))
    args = p.parse_args(argv)
    policies = [x for x in args.policies.split(",") if x]
    if BASE not in policies:
        policies.insert(0, BASE)
    rows = run(args.replay, [float(c) for c in args.cvs.split(",")], [float(r) for r in args.rps.split(",")],
               args.seeds, args.duration, policies)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps({"replay": str(args.replay), "policies": policies,
                                                     "rows": rows}, indent=1))
    print(table(rows, policies))
    plot(rows, policies, args.out / "curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
