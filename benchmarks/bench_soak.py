"""Soak and chaos: N HTTP streams back to back for T seconds, processes SIGKILLed at chosen times; every
request's outcome (finished, failed or cut, with why), tokens per 10 s, each process's memory over time.

    # a cluster it starts: two CPU nodes, a tiny random-weight Llama (deterministic: true), 16 streams, 3 minutes
    python benchmarks/bench_soak.py --streams 16 --duration 180 --kill node@60,http@120 --json soak.json --png soak.png
    # the nodes sharing one GPU, a model from a path
    python benchmarks/bench_soak.py --device cuda:0 --model-source $SLLM_HOME/models/smollm2-135m --streams 256 ...
    # a topology of yours (its first model unless --model), or a cluster already running
    python benchmarks/bench_soak.py --topology topology.yaml ...
    python benchmarks/bench_soak.py --url http://127.0.0.1:8000 --cluster tcp://127.0.0.1:7700 --up-pid PID ...

Kills (``--kill``, seconds from the load's start): ``node-1@60`` (a node by name), ``node@60`` (the node running
the most requests then), ``http@120`` (the HTTP front end), ``controller@200``. Greedy streams are checked
token for token against each prompt's reference run (``--no-check`` to skip: only meaningful where the engine is
deterministic for them). The load itself is ``sllm_eval/soak.py``; the short CPU run is ``tests/test_soak.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_topology(work: Path, args: argparse.Namespace, source: str) -> Path:
    import yaml

    model: dict[str, Any] = {"name": args.model or "soak", "source": source, "keep_alive": "30m",
                             "max_instances": args.max_instances, "target_concurrency": args.target_concurrency,
                             "deterministic": args.deterministic}
    if args.dtype:
        model["dtype"] = args.dtype
    if args.kv_cache:
        model["kv_cache"] = args.kv_cache
    topo = {
        "controller": {"host": "127.0.0.1", "client_port": 0, "cluster_port": 0, "state_port": 0,
                       "http_port": free_port()},
        "nodes": [{"name": f"node-{i}", "gpus": [{"device": args.device, "memory": args.gpu_memory}],
                   "threads": args.threads, "dram": {"capacity": args.dram},
                   "ssd": {"path": str(work / f"ssd-{i}"), "capacity": "20GiB"}}
                  for i in range(1, args.nodes + 1)],
        "models": [model],
        # recompute: a resumed or migrated request carries its token log only (the exactness check's path).
        "scheduler": {"migration_transfer": "recompute"},
    }
    path = work / "topology.yaml"
    path.write_text(yaml.safe_dump(topo))
    return path


def start_cluster(topology: Path, env: dict[str, str], http_port: int | None) -> tuple[subprocess.Popen[str], str, str]:
    """``sllm up TOPOLOGY --headless``; (process, client endpoint, http endpoint) once it prints ready."""
    cmd = [sys.executable, str(REPO / "cli.py"), "up", str(topology), "--headless"]
    if http_port is not None:
        cmd += ["--http-port", str(http_port)]
    proc = subprocess.Popen(cmd, cwd=topology.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ready:"):
            words = line.split()
            if "http" not in words:
                proc.terminate()
                raise SystemExit("the cluster has no HTTP front end (http_port 0)")
            # The rest of its output goes to a file, read by nobody unless something is to be explained.
            threading.Thread(target=_copy_log, args=(proc, lines, topology.parent / "cluster.log"),
                             daemon=True).start()
            return proc, words[words.index("client") + 2], words[words.index("http") + 2]
    raise SystemExit("sllm up exited before it was ready:\n" + "".join(lines[-40:]))


def _copy_log(proc: subprocess.Popen[str], head: list[str], path: Path) -> None:
    assert proc.stdout is not None
    with open(path, "a", buffering=1) as log:  # line by line: a daemon thread gets no flush at exit
        log.writelines(head)
        log.writelines(proc.stdout)


def stop_cluster(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--topology", type=Path, help="start `sllm up` on this topology (it needs an HTTP port)")
    where.add_argument("--url", help="a running cluster's HTTP front end (no cluster is started)")
    parser.add_argument("--cluster", default="", help="with --url: the router's client endpoint (node kills, the "
                        "check that nothing is left running)")
    parser.add_argument("--up-pid", type=int, default=0, help="with --url: the `sllm up` process (kills, RSS)")
    parser.add_argument("--model", default="", help="the model to load (default: the topology's first)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kill", default="", help="TARGET@SECONDS,... (node-1, node, http, controller)")
    parser.add_argument("--no-check", action="store_true", help="skip the token-for-token check")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds in-flight requests get after the load")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which the streams' first requests "
                        "are spread (streams started together stay in step)")
    parser.add_argument("--api-key", default=os.environ.get("SLLM_API_KEY", "").split(",")[0])
    built = parser.add_argument_group("the cluster it builds (without --topology or --url)")
    built.add_argument("--device", default="cpu", help="every node's one GPU: cpu, or cuda:0 (shared by the nodes)")
    built.add_argument("--nodes", type=int, default=2)
    built.add_argument("--model-source", default="", help="checkpoint path (default: a tiny random-weight Llama)")
    built.add_argument("--threads", type=int, default=1, help="torch threads per node")
    built.add_argument("--gpu-memory", default="2GiB")
    built.add_argument("--dram", default="2GiB")
    built.add_argument("--dtype", default="")
    built.add_argument("--kv-cache", default="")
    built.add_argument("--max-instances", type=int, default=2)
    built.add_argument("--target-concurrency", type=int, default=8)
    built.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                       help="the model's deterministic: (default: on for cpu, where the check needs it)")
    parser.add_argument("--json", type=Path, help="write summary and record here")
    parser.add_argument("--png", type=Path, help="tokens per 10 s and RSS over time, kills marked")
    args = parser.parse_args(argv)

    from sllm_eval.soak import SoakConfig, parse_kills, plot, run_soak, summarize

    kills = parse_kills(args.kill)
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    proc: subprocess.Popen[str] | None = None
    try:
        if args.url:
            url, endpoint, up_pid = args.url.rstrip("/"), args.cluster, args.up_pid
            if kills and not up_pid:
                parser.error("--kill with --url needs --up-pid (the processes are found under it)")
            model = args.model
        else:
            if args.topology is not None:
                import yaml

                topology = args.topology.resolve()
                data = yaml.safe_load(topology.read_text())
                model = args.model or data["models"][0]["name"]
                http = None if (data.get("controller") or {}).get("http_port", 8000) else free_port()
                env: dict[str, str] = {}
            else:
                # A fresh home and keys: nothing of an earlier run (a DRAM copy, a key) changes this one.
                os.environ["SLLM_KEYS"] = str(work / "keys")
                if args.deterministic is None:
                    args.deterministic = args.device == "cpu"
                source = args.model_source
                if not source:
                    from sllm_eval.tiny_models import make_tiny_model

                    source = str(make_tiny_model(work / "tiny", arch="llama", seed=0))
                topology = write_topology(work, args, source)
                model, http, env = args.model or "soak", None, {"SLLM_HOME": str(work / "home"),
                                                                "SLLM_LOG_LEVEL": "WARNING"}
            proc, endpoint, url = start_cluster(topology, env, http)
            up_pid = proc.pid
        if not model:
            parser.error("--model is needed with --url")
        cfg = SoakConfig(url=url, model=model, streams=args.streams, duration_s=args.duration,
                         max_tokens=args.max_tokens, kills=kills, up_pid=up_pid, client_endpoint=endpoint,
                         api_key=args.api_key, check_tokens=not args.no_check, drain_s=args.drain,
                         ramp_s=args.ramp)
        print(f"soak: {args.streams} streams for {args.duration:.0f}s against {url} (model {model}), "
              f"kills: {args.kill or 'none'}; cluster logs in {work}", flush=True)
        raw = asyncio.run(run_soak(cfg, say=lambda text: print(text, flush=True)))
    finally:
        if proc is not None:
            stop_cluster(proc)
    summary = summarize(raw)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("memory", "tokens_per_10s", "cuda_graphs")},
                     indent=1))
    for gpu, g in summary["cuda_graphs"].items():
        print(f"  cuda graphs {gpu:20s} {g['first']} -> {g['last']} (max {g['max']})")
    for name, mem in summary["memory"].items():
        print(f"  rss {name:28s} {mem['first_mib']:8.1f} -> {mem['last_mib']:8.1f} MiB "
              f"(settled spread {mem['settled_spread_pct']:.1f} %, slope {mem['settled_slope_mib_per_min']} MiB/min, "
              f"late half {mem['late_slope_mib_per_min']} MiB/min)")
        if mem.get("late_slope_by_part_mib_per_min"):
            print("      late half by part (MiB/min): " + ", ".join(
                f"{part} {slope}" for part, slope in mem["late_slope_by_part_mib_per_min"].items()))
    if args.json:
        for o in raw["outcomes"]:
            del o["token_ids"]  # checked already; thousands of lists of ids are not a record
        info = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
                "load_avg": os.getloadavg(), "command": " ".join(sys.argv), "summary": summary, "record": raw}
        args.json.write_text(json.dumps(info, indent=1))
    if args.png:
        plot(raw, args.png, title=f"{args.streams} streams, kills: {args.kill or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
