"""Placement policies compared on one replayed workload, each against a real cluster of its own.

    python benchmarks/bench_replay.py --policy all [--trace gamma|azure-conv|azure-code] [--rps 0.7] [--cv 2]
        [--models 4] [--duration 120] [--seed 0] [--json out.json] [--png out.png] [--cluster tcp://HOST:PORT]

The same as ``sllm bench replay``; everything is in :mod:`sllm_eval.replay` (``--help`` lists every
option). Without ``--cluster``, for each policy it writes a topology with the model family (random-weight
variants of SmolLM2-135M's architecture at about 50, 150, 400 and 1000 MB, cached in ``$SLLM_HOME/family``)
on 2 nodes x 1 ``cpu`` device with room for about two models each, DRAM and SSD tiers smaller than the
family, throttled SSD and repository reads and a 10 s keep-alive; starts the cluster, replays the workload
(the same arrivals for every policy), stops it, and prints p50/p99 latency and TTFT, cold starts by tier,
migrations and preemptions per policy, and the p99 ratios of every policy over serverlessllm.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sllm_eval.replay import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
