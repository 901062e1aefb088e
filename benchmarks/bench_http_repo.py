"""How fast a node fetches a checkpoint from a model repository over HTTP, against the link it has.

    python benchmarks/bench_http_repo.py [--gb 1.0] [--connections 1,2,4,8] [--range-mib 32] [--url URL]
                                         [--json OUT] [--work DIR]

Writes a random-weight checkpoint of about ``--gb`` GB in our format (or takes ``--url``, a checkpoint any
server already serves), serves it from this process with ``sllm_eval.repository_server`` (Range, threads) and
fetches it with ``HttpCheckpointFetch`` once per connection count, each chunk checked as it arrives. Also a
fetch with a load reading behind it (``load_state_dict(arrival=...)``: the pipelined cold start's read), a fetch
from a server without Range (the standard library's handler: one connection per file) and, as the ceiling, one
plain streaming GET of every partition with nothing checked or written. On one machine the link is loopback;
throttle it with ``tc`` (or serve from another host with ``--url``) to measure a real one. Prints a table;
``--json`` writes the figures. Results belong in RESULTS.md only from a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_checkpoint(dest: Path, gb: float) -> Path:
    import torch

    from sllm_actors.storage import save_checkpoint

    n = max(1, int(gb * 1e9 / (64 << 20)))
    gen = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(32 << 20, generator=gen, dtype=torch.float32).to(torch.bfloat16)
             for i in range(n)}
    save_checkpoint(state, dest, partition_bytes=1 << 30)
    return dest


def ceiling(url: str, files: list[str]) -> float:
    """Bytes/s of plain streaming GETs of every partition, one after another (nothing checked or kept)."""
    import httpx

    total, started = 0, time.perf_counter()
    with httpx.Client(timeout=60) as client:
        for name in files:
            with client.stream("GET", url + name) as resp:
                for data in resp.iter_raw(8 << 20):
                    total += len(data)
    return total / (time.perf_counter() - started)


def fetch_once(url: str, work: Path, connections: int, range_mib: int, load: bool = False) -> dict[str, Any]:
    from sllm_actors.storage import HttpCheckpointFetch, load_state_dict

    dest = work / f"fetch-{connections}-{int(load)}"
    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    fetch = HttpCheckpointFetch(url, dest, connections=connections, range_bytes=range_mib << 20).start()
    if load:
        load_state_dict(fetch.path, arrival=fetch, direct_io=False)
    fetch.result(3600)
    wall = time.perf_counter() - started
    fetch.discard()
    return {"connections": connections, "load_behind": load, "ranged": fetch.ranged, "bytes": fetch.nbytes,
            "seconds": wall, "partitions_seconds": fetch.seconds, "gb_s": fetch.nbytes / wall / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--connections", default="1,2,4,8")
    parser.add_argument("--range-mib", type=int, default=32)
    parser.add_argument("--url", default="", help="fetch this checkpoint URL instead of serving one here")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()

    from sllm_actors.storage import read_index
    from sllm_eval.repository_server import serve

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-http-repo-"))
    work.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        if args.url:
            url, files, plain_url = args.url if args.url.endswith("/") else args.url + "/", [], ""
        else:
            root = work / "repo"
            if not (root / "ckpt" / "index.json").is_file():
                make_checkpoint(root / "ckpt", args.gb)
            files = [p.file for p in read_index(root / "ckpt").partitions]
            servers = [serve(root), serve(root, ranges=False)]
            url, plain_url = servers[0].url + "ckpt/", servers[1].url + "ckpt/"
        rows: list[dict[str, Any]] = []
        for n in (int(x) for x in args.connections.split(",")):
            rows.append(fetch_once(url, work, n, args.range_mib))
        rows.append(fetch_once(url, work, 4, args.range_mib, load=True))
        if plain_url:
            rows.append({**fetch_once(plain_url, work, 4, args.range_mib), "server": "no Range"})
        result: dict[str, Any] = {"url": url, "range_mib": args.range_mib, "fetches": rows}
        if files:
            result["ceiling_gb_s"] = ceiling(url, files) / 1e9
        print(f"{'connections':>11} {'load behind':>11} {'ranged':>6} {'GB':>6} {'s':>7} {'GB/s':>6}")
        for r in rows:
            print(f"{r['connections']:>11} {r['load_behind']!s:>11} {r['ranged']!s:>6} {r['bytes'] / 1e9:>6.2f} "
                  f"{r['seconds']:>7.2f} {r['gb_s']:>6.2f}")
        if "ceiling_gb_s" in result:
            print(f"ceiling (one plain GET stream, nothing checked or written): {result['ceiling_gb_s']:.2f} GB/s")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        for server in servers:
            server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
