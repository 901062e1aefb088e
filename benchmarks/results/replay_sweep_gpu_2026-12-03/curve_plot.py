"""The table and plot of curve_sim.json (see curve_sim.py)."""
import json, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
d = json.load(open('benchmarks/results/replay_sweep_gpu_2026-12-03/curve_sim.json'))
rows = d['rows']
pols = ('serverlessllm', 'random', 'rayserve')
fig, axes = plt.subplots(1, 4, figsize=(18, 4))
table = ["| CV | req/s | serverlessllm mean / p99 s | random / serverlessllm: mean, p99 | rayserve / serverlessllm: mean, p99 |", "|---|---|---|---|---|"]
for ci, cv in enumerate((2.0, 8.0)):
    rpss = sorted({r['rps'] for r in rows if r['cv'] == cv})
    for pi, point in enumerate(('mean', 'p99')):
        ax = axes[ci * 2 + pi]
        for p in pols:
            ys = [statistics.mean(r[p][point] for r in rows if r['cv'] == cv and r['rps'] == x) for x in rpss]
            ax.plot(rpss, ys, marker='o', label=p)
        ax.set_title(f"CV {cv:g}: latency {point}"); ax.set_xlabel("req/s"); ax.set_ylabel("s"); ax.grid(alpha=.3)
        if ci == 0 and pi == 0: ax.legend()
    for x in rpss:
        sel = [r for r in rows if r['cv'] == cv and r['rps'] == x]
        b = {k: statistics.mean(r['serverlessllm'][k] for r in sel) for k in ('mean', 'p99')}
        def rr(p, k): return statistics.mean(r[p][k] / r['serverlessllm'][k] for r in sel)
        def mn(p, k): return min(r[p][k] / r['serverlessllm'][k] for r in sel)
        table.append(f"| {cv:g} | {x:g} | {b['mean']:.2f} / {b['p99']:.2f} | {rr('random','mean'):.2f} (min {mn('random','mean'):.2f}), {rr('random','p99'):.2f} (min {mn('random','p99'):.2f}) | {rr('rayserve','mean'):.2f} (min {mn('rayserve','mean'):.2f}), {rr('rayserve','p99'):.2f} (min {mn('rayserve','p99'):.2f}) |")
fig.tight_layout(); fig.savefig(sys.argv[1], dpi=90)
print("\n".join(table))
