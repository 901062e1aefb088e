"""A model repository fetch between two hosts over a throttled link, as a share of what the link carries.

    sudo .venv/bin/python benchmarks/bench_hosts_repo.py [--rate 200mbit] [--mb 300] [--connections 4]
                                                         [--reps 2] [--json OUT]

Two hosts (network namespaces, ``sllm_eval.hosts``): ``repository`` serves a random-weight checkpoint of about
``--mb`` MB in our format (``sllm_eval.repository_server``, Range, threads), ``node`` fetches it. The repository's
link is throttled with ``tc tbf`` to ``--rate`` both ways. In the same run, alternating, ``--reps`` times each:

- **link**: a plain TCP transfer of the same number of bytes from the repository host to the node host (one
  connection, nothing checked or written): what the link carries, measured as iperf would;
- **fetch**: ``HttpCheckpointFetch`` (parallel range requests, every chunk's CRC checked, written to the node's
  disk) with ``load_state_dict(arrival=...)`` reading behind it, the pipelined cold start's read: from the first
  request until the last tensor is loaded;
- **fetch alone**: the same fetch with no load behind it.

Prints each and the fetch's share of the link (goal: the pipelined fetch at >= 90 % of the link). Needs root;
about 2 minutes at the defaults. Results belong in RESULTS.md only from a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PORT = 5201


def serve_bytes(nbytes: int) -> None:
    """On the repository host: send ``nbytes`` to each client that connects (the link measurement's server)."""
    srv = socket.create_server(("0.0.0.0", PORT), reuse_port=True)
    print("listening", flush=True)
    block = b"\0" * (1 << 20)
    while True:
        conn, _ = srv.accept()
        left = nbytes
        with conn:
            while left > 0:
                left -= conn.send(block[:min(left, len(block))])


def read_bytes(address: str, nbytes: int) -> None:
    """On the node host: read ``nbytes`` from the server; prints the seconds from connect to the last byte."""
    started = time.perf_counter()
    with socket.create_connection((address, PORT), timeout=120) as conn:
        got = 0
        while got < nbytes:
            data = conn.recv(4 << 20)
            if not data:
                raise SystemExit(f"the server closed after {got} of {nbytes} bytes")
            got += len(data)
    print(json.dumps({"seconds": time.perf_counter() - started, "bytes": got}), flush=True)


def fetch(url: str, dest: Path, connections: int, range_mib: int, load: bool) -> None:
    """On the node host: one fetch (with the load behind it when ``load``); prints its figures."""
    from sllm_actors.storage import HttpCheckpointFetch, load_state_dict

    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    f = HttpCheckpointFetch(url, dest, connections=connections, range_bytes=range_mib << 20).start()
    if load:
        load_state_dict(f.path, arrival=f, direct_io=False)
    f.result(600)
    seconds = time.perf_counter() - started
    f.discard()
    print(json.dumps({"seconds": seconds, "bytes": f.nbytes, "ranged": f.ranged}), flush=True)


def _last_json(run: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    if run.returncode != 0:
        raise SystemExit(f"{what} failed ({run.returncode}):\n{run.stdout}{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="200mbit", help="the repository link's tc tbf rate")
    parser.add_argument("--burst", default="256kb", help="tbf burst (at least rate / HZ)")
    parser.add_argument("--mb", type=float, default=300.0, help="checkpoint size, MB")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--range-mib", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--role", nargs="*", help=argparse.SUPPRESS)  # what this script runs on a host
    args = parser.parse_args()
    if args.role:
        role, *rest = args.role
        if role == "serve":
            serve_bytes(int(rest[0]))
        elif role == "read":
            read_bytes(rest[0], int(rest[1]))
        elif role == "fetch":
            fetch(rest[0], Path(rest[1]), int(rest[2]), int(rest[3]), rest[4] == "1")
        return 0

    from bench_http_repo import make_checkpoint

    from sllm_actors.storage import read_index
    from sllm_eval.hosts import Hosts, start_repository, sweep_stale, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"cannot make hosts here: {reason}", file=sys.stderr)
        return 2
    sweep_stale()
    root = Path(tempfile.mkdtemp(prefix="bench-hosts-repo-"))
    me = [sys.executable, str(Path(__file__).resolve())]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(root)}
    procs: list[subprocess.Popen[str]] = []
    try:
        with Hosts(root, ["repository", "node"]) as hosts:
            repo_host, node = hosts["repository"], hosts["node"]
            models = repo_host.home / "models"
            print(f"writing a {args.mb:.0f} MB checkpoint ...", flush=True)
            make_checkpoint(models / "ckpt", args.mb / 1000)
            nbytes = sum(p.nbytes for p in read_index(models / "ckpt").partitions)
            repository = start_repository(repo_host, models)
            procs.append(repository.proc)
            server = repo_host.popen([*me, "--role", "serve", str(nbytes)], env=env, stdout=subprocess.PIPE)
            procs.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == "listening"
            repo_host.limit(args.rate, burst=args.burst)
            url = repository.url + "ckpt/"
            dest = node.home / "fetched"
            rows: dict[str, list[dict[str, Any]]] = {"link": [], "fetch": [], "fetch alone": []}
            for rep in range(args.reps):
                rows["link"].append(_last_json(node.run([*me, "--role", "read", repo_host.address, str(nbytes)],
                                                        env=env, timeout=600), "the link transfer"))
                for name, load in (("fetch", "1"), ("fetch alone", "0")):
                    rows[name].append(_last_json(node.run(
                        [*me, "--role", "fetch", url, str(dest), str(args.connections), str(args.range_mib), load],
                        env=env, timeout=600), name))
                print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]['bytes'] / v[-1]['seconds'] / 1e6:.1f} MB/s"
                                                    for k, v in rows.items()), flush=True)
            rates = {k: statistics.median(r["bytes"] / r["seconds"] for r in v) for k, v in rows.items()}
            result = {"rate": args.rate, "bytes": nbytes, "connections": args.connections, "range_mib": args.range_mib,
                      "reps": args.reps, "rows": rows, "median_bytes_per_s": rates,
                      "fetch_share_of_link": rates["fetch"] / rates["link"],
                      "fetch_alone_share_of_link": rates["fetch alone"] / rates["link"]}
            print(f"\nlink {args.rate} (tc tbf), {nbytes / 1e6:.0f} MB, median of {args.reps}:")
            for k, v in rates.items():
                print(f"  {k:<12} {v / 1e6:7.1f} MB/s  {v / rates['link']:6.1%} of the link")
            print(f"goal: the pipelined fetch at >= 90 % of the link: "
                  f"{'met' if result['fetch_share_of_link'] >= 0.9 else 'NOT met'}")
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
