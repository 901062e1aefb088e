"""Start-up estimates against load times in the simulator, on the workloads and costs of real replays.

    python benchmarks/estimator_error.py benchmarks/results/replay_*.json

For each replay JSON (``sllm bench replay --json``) and each of its policies: the simulator runs that
replay's workload with costs calibrated from it (``sllm_eval/sim_validate.py``, the validation's own
set-up: node load pipeline, the same estimator code as the scheduler), and every load that a placement
decision estimated is compared with its simulated time, from the order to the end (queue waits in it).
A noise-free comparison of estimator versions: the real replay's load times move with the host's load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sllm_actors import sim_validate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("replays", nargs="+", help="JSON files of `sllm bench replay --json`")
    args = parser.parse_args()
    print(f"{'replay':40} {'policy':14} {'loads':>5} {'mean err':>8} {'|err|':>6} {'abs s':>6}  by tier (n, mean err)")
    for path in args.replays:
        result = sim_validate.validate(sim_validate.load_replay(path))
        for row in result["policies"]:
            est = row["sim"]["estimator"]
            if not est["count"]:
                continue
            tiers = ", ".join(f"{tier} {v['count']} {100 * v['mean_rel_error']:+.0f}%"
                              for tier, v in est["by_tier"].items() if v["count"])
            print(f"{Path(path).name:40} {row['policy']:14} {est['count']:>5} {100 * est['mean_rel_error']:>+7.1f}% "
                  f"{100 * est['mean_abs_rel_error']:>5.1f}% {est['mean_abs_error_s']:>6.2f}  {tiers}")


if __name__ == "__main__":
    main()
