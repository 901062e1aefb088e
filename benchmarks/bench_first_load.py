"""What a fresh node process pays on its first model load, with and without warming its imports first.

    python benchmarks/bench_first_load.py [CHECKPOINT] [--reps 3]

Each rep starts two fresh Python processes that import what a node process imports at module level, then
load ``CHECKPOINT`` (our format; default: the replay family's 50 MB model, else the default model) twice
with ``load_model`` + ``load_tokenizer``. One process calls ``warm_imports()`` first (what ``Node.run``
does before it reports ready), the other imports only what ``Node.run`` imported before that change
(transformers' auto classes). The figure: the first load against the second, in each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import sllm_actors.actors.node.process  # noqa: F401  -- a node process's module-level imports
warm_s = 0.0
if {warm!r}:
    from sllm_actors.storage.model import warm_imports
    t = time.perf_counter(); warm_imports(); warm_s = time.perf_counter() - t
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # what Node.run imported before
from sllm_actors.storage import load_model, load_tokenizer
loads = []
for _ in range(2):
    t = time.perf_counter(); load_model({path!r}, "cpu"); load_tokenizer({path!r}); loads.append(time.perf_counter() - t)
print(json.dumps({{"warm_s": warm_s, "loads": loads}}))
"""


def main() -> int:
    sys.path.insert(0, str(REPO))
    from sllm_actors.models import default_model_dir, sllm_home

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    family = sllm_home() / "family" / "llama-50mb-s0"
    parser.add_argument("checkpoint", nargs="?", default=str(family if family.is_dir() else default_model_dir()))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rows: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.reps):
        for warm in (False, True):
            code = CHILD.format(repo=str(REPO), warm=warm, path=args.checkpoint)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows[warm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"checkpoint {args.checkpoint}, {args.reps} reps, seconds (median)")
    for warm, label in ((False, "first load as before (imports inside it)"), (True, "warm_imports() first")):
        first = statistics.median(r["loads"][0] for r in rows[warm])
        second = statistics.median(r["loads"][1] for r in rows[warm])
        warm_s = statistics.median(r["warm_s"] for r in rows[warm])
        print(f"  {label:42s} first {first:6.2f}  second {second:6.2f}  first/second {first / second:5.1f}x"
              + (f"  (warm_imports {warm_s:.2f} s, before the node is ready)" if warm else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
