"""Latency against RPS on the simulator, the GPU sweep's cluster and costs (run 1, CV 2 seed 0, pooled).

    python benchmarks/results/replay_sweep_gpu_2026-12-03/curve_sim.py RUN1_CV2_S0.json   # from the repository root
    python benchmarks/results/replay_sweep_gpu_2026-12-03/curve_plot.py curve_sim.png     # the table and the plot

RUN1_CV2_S0.json is run 1's per-seed replay JSON (in the call's archive; the merged JSON holds the same runs).
"""
import json, sys, statistics
sys.path.insert(0, '.')
from sllm_eval.sim_validate import load_replay, derive_calibration, replay_config
from sllm_eval.replay import build_workload
from sllm_eval.simulator import simulate
replay = load_replay(sys.argv[1])
cal = derive_calibration(replay)
cfg = replay_config(replay, cal)
names = [f['name'] for f in replay['family']]
out = []
for cv in (2.0, 8.0):
    for rps in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0):
        for seed in (0, 1, 2):
            work = build_workload('gamma', models=names, rps=rps, cv=cv, duration_s=300, seed=seed,
                                  prompt_range=(16, 128), output_range=(8, 32))
            row = {'cv': cv, 'rps': rps, 'seed': seed, 'requests': len(work)}
            for p in ('serverlessllm', 'random', 'rayserve'):
                s = simulate(cfg, work, p, seed).summary()
                row[p] = {'mean': s['latency_s']['mean'], 'p50': s['latency_s']['p50'], 'p99': s['latency_s']['p99'], 'failed': s['failed']}
            out.append(row)
            print(json.dumps(row), flush=True)
json.dump({'calibration_from': 'cv2_s0.json (run 1), pooled', 'rows': out}, open('benchmarks/results/replay_sweep_gpu_2026-12-03/curve_sim.json', 'w'), indent=1)
