"""Checkpoint-loading benchmark (see sllm_eval/storage_bench.py for what is measured).

python benchmarks/bench_store.py --device cpu --size-gb 1 --json out.json
python benchmarks/bench_store.py --device cuda:0 --size-gb 8 --json out.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sllm_eval.storage_bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (1e9 bytes)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")
    parser.add_argument("--workdir", default=None, help="where to write checkpoints (a real disk, not tmpfs)")
    parser.add_argument("--threads", type=int, default=None, help="loader threads (default min(8, 2*cpus))")
    parser.add_argument(
        "--model-layers",
        type=int,
        default=4,
        help="layers of the 7B-config Llama for the model-ready comparison (0 skips it)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    args = parser.parse_args()
    run_bench(
        args.device,
        args.size_gb,
        args.json_path,
        workdir=args.workdir,
        threads=args.threads,
        model_layers=args.model_layers,
        keep=args.keep,
    )


if __name__ == "__main__":
    main()
