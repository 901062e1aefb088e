"""The long live fuzz: N random and mutated frames on each bound socket of a fresh loopback cluster, with no
key, a foreign key and the valid key for that socket; then the checks of tests/test_fuzz_live.py, with
the counts and figures printed as JSON.

    python benchmarks/fuzz_live.py [--frames 100000] [--seed 14] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "The capital of France is"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="frames per socket and key (default 100000)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", dest="json_out", default="")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fuzz-live-"))
    os.environ["SLLM_KEYS"] = str(work / "keys")

    from sllm_actors.client import Client
    from sllm_eval.fuzz import rss_bytes, run_campaign
    from sllm_eval.tiny_models import make_tiny_model
    from tests.conftest import start_cluster, stop_cluster, write_topology
    from tests.test_fuzz_live import fuzz_keys

    model = make_tiny_model(work / "tiny", arch="llama", seed=0)
    cluster = start_cluster(write_topology(work / "topology.yaml", {"tiny": model}, nodes=2))
    try:
        with Client(cluster.endpoint) as client:
            before = client.complete("tiny", PROMPT, max_tokens=32).token_ids
        pids = {"controller": cluster.proc.pid, **cluster.node_pids()}
        rss_before = {k: rss_bytes(p) for k, p in pids.items()}
        endpoints = {"clients": cluster.endpoint, "cluster": cluster.cluster_endpoint(),
                     "state": cluster.state_endpoint}
        started = time.monotonic()
        rows = run_campaign(endpoints, args.frames, args.seed, fuzz_keys(work), ["node-1", "node-2"])
        fuzz_s = time.monotonic() - started
        with Client(cluster.endpoint) as client:
            after = client.complete("tiny", PROMPT, max_tokens=32).token_ids
            status = client.status()
        rss_after = {}
        for n in status["nodes"]:
            rss_after[n["name"]] = rss_bytes(n["pid"]) if n["pid"] == pids.get(n["name"]) else None
        rss_after["controller"] = rss_bytes(cluster.proc.pid)
        log = "".join(cluster.lines)
        report: dict[str, Any] = {
            "command": "python benchmarks/fuzz_live.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "frames_per_target": args.frames,
            "rows": rows,
            "frames_sent": sum(r["sent"] for r in rows),
            "fuzz_seconds": round(fuzz_s, 1),
            "token_identical_after": after == before,
            "nodes_alive_after": all(n["alive"] for n in status["nodes"]),
            "node_restarts": {n["name"]: n["restarts"] for n in status["nodes"]},
            "rss_mib_before": {k: round(v / 2**20, 1) for k, v in rss_before.items()},
            "rss_mib_after": {k: (round(v / 2**20, 1) if v else None) for k, v in rss_after.items()},
            "log_refused_connections": log.count("refused a connection"),
            "log_bad_frames": log.count("bad frame"),
            "log_refused_messages": log.count(": refused "),
        }
    finally:
        stop_cluster(cluster)
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    ok = report["token_identical_after"] and report["nodes_alive_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
