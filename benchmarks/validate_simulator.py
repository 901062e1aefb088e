"""Validate the simulator against a real replay: the same workload and cluster, costs from the replay's
measurements (see ``sllm_eval/sim_validate.py``), real against simulated latency per policy.

    python benchmarks/validate_simulator.py REPLAY.json [--policy all] [--json OUT] [--seed K]
        [--calibration-out CAL.json] [--per-policy-calibration] [--markdown]

REPLAY.json is what ``sllm bench replay --json`` (or ``benchmarks/bench_replay.py``) wrote. The derived
calibration is printed (and written with ``--calibration-out``, in the format ``sllm simulate
--calibration`` reads). Pass: mean and p50 latency within 20 % of the real run, per policy; p99 and
TTFT are reported too. Exit status 0 if every policy passes, 1 if one does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sllm_eval.sim_validate import (
    WARMUP_BYTES,
    ReplayError,
    derive_calibration,
    format_report,
    load_replay,
    validate,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="validate_simulator.py", description=__doc__.split("\n\n")[0])
    p.add_argument("replay", type=Path, help="JSON of `sllm bench replay --json`")
    p.add_argument("--policy", default="all", help="a policy of the replay, a comma list, or all")
    p.add_argument("--json", type=Path, default=None, help="write the comparison (and the calibration) here")
    p.add_argument("--calibration-out", type=Path, default=None, help="write the derived calibration here")
    p.add_argument("--seed", type=int, default=0, help="the simulator's seed (the random policy's choices)")
    p.add_argument("--per-policy-calibration", action="store_true",
                   help="calibrate each policy from its own run (the host's load during it) instead of all runs")
    p.add_argument("--warmup-bytes", type=int, default=WARMUP_BYTES,
                   help="size of the replay's warm-up model in the tiers at the start")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    try:
        replay = load_replay(args.replay)
        policies = list(replay["records"]) if args.policy == "all" else [x.strip() for x in args.policy.split(",")]
        unknown = [x for x in policies if x not in replay["records"]]
        if unknown:
            raise ReplayError(f"{args.replay}: no records for {', '.join(unknown)} "
                              f"(it has {', '.join(replay['records'])})")
        calibration = derive_calibration(replay)
        result = validate(replay, policies, seed=args.seed, per_policy=args.per_policy_calibration,
                          warmup_bytes=args.warmup_bytes)
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a = replay.get("args") or {}
    m = replay.get("machine") or {}
    print(f"# {args.replay}: {len(replay['records'][policies[0]])} requests, device {a.get('device', 'cpu')}, "
          f"{a.get('nodes', 2)} nodes x {a.get('gpus_per_node', 1)}, machine {m.get('host', '?')} "
          f"({m.get('cpus', '?')} cpus); seed {args.seed}; calibration "
          + ("per policy" if args.per_policy_calibration else "pooled over all policies"))
    cal = {k: v for k, v in calibration.items() if k != "comment"}
    print("# calibration: " + json.dumps(cal, default=lambda x: round(x, 6)))
    print(format_report(result, markdown=args.markdown))
    print(f"# bar: |error| <= {result['bar']:.0%} on {', '.join(result['held'])} per policy: "
          + ("PASS" if result["pass"] else "FAIL (" + ", ".join(r["policy"] for r in result["policies"]
                                                              if not r["pass"]) + ")"))
    if args.calibration_out:
        args.calibration_out.write_text(json.dumps(calibration, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"replay": str(args.replay), **result}, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
