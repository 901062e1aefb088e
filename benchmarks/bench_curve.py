"""What CURVE costs per token on the streaming path: the same cluster with and without it, in one run.

    python benchmarks/bench_curve.py [--tokens 128] [--reps 7] [--json out.json]

Two clusters of the same topology (one node, one ``cpu`` device, a tiny random-weight Llama) run side by
side in this process: one with keys (every socket CURVE, ZAP, per-frame role checks), one started without
(``Controller(keys=None)``, nodes ``--insecure``). Requests alternate between them so the machine's drift
hits both alike; the figure is the client's inter-token time (instance -> node link -> controller IO thread
-> router -> client), median over all intervals, and the greedy token ids of both must be equal.

A second, smaller figure isolates the socket layer: one DEALER -> ROUTER -> DEALER echo of a token-sized
frame, with and without CURVE, in this process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sllm_actors.client import Client, TokenEvent
from sllm_actors.actors.controller.process import Controller
from sllm_actors.runtime.security import KeyRing, init_keys, load_credentials
from sllm_eval.tiny_models import make_tiny_model
from sllm_actors.runtime.topology import parse_topology

PROMPT = "The capital of France is"


def _topology(work: Path, model: Path, tag: str) -> Any:
    data = {
        "controller": {"host": "127.0.0.1", "client_port": 0, "cluster_port": 0, "state_port": 0},
        "nodes": [{"name": "node-1", "gpus": [{"device": "cpu", "memory": "1GiB"}], "threads": 1,
                   "dram": {"capacity": "1GiB"}, "ssd": {"path": str(work / f"ssd-{tag}"), "capacity": "1GiB"}}],
        "models": [{"name": "tiny", "source": str(model)}],
    }
    return parse_topology(data, work / f"topology-{tag}.yaml")


def _intervals(client: Client, tokens: int) -> tuple[list[float], list[int]]:
    times, ids = [], []
    for event in client.generate("tiny", PROMPT, max_tokens=tokens):
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter())
            ids.extend(event.token_ids)
    return [b - a for a, b in itertools.pairwise(times)], ids


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (load-independent, unlike wall-clock medians)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _echo_us(curve: bool, n: int, size: int = 64) -> tuple[float, float]:
    """(wall µs, CPU µs of this process, ZeroMQ's IO threads included) per echo round trip."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if curve:
        spub, ssec = zmq.curve_keypair()
        cpub, csec = zmq.curve_keypair()
        router.curve_server = True
        router.curve_publickey, router.curve_secretkey = spub, ssec
        dealer.curve_publickey, dealer.curve_secretkey, dealer.curve_serverkey = cpub, csec, spub
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    payload = os.urandom(size)
    for _ in range(100):
        dealer.send(payload)
        ident, _ = router.recv_multipart()
        router.send_multipart([ident, payload])
        dealer.recv()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        dealer.send(payload)
        ident, _ = router.recv_multipart()
        router.send_multipart([ident, payload])
        dealer.recv()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    router.close(0)
    dealer.close(0)
    ctx.term()
    return elapsed / n * 1e6, cpu / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--echoes", type=int, default=20000)
    parser.add_argument("--json", dest="json_out", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-curve-"))
    model = make_tiny_model(work / "tiny", arch="llama", seed=0)
    keys_root = work / "keys"
    init_keys(keys_root, ["node-1"])
    secure = Controller(_topology(work, model, "curve"), keys=KeyRing(keys_root))
    plain = Controller(_topology(work, model, "plain"), keys=None)
    operator = load_credentials(keys_root / "operator.key_secret")
    for c in (secure, plain):
        c.start()
    try:
        for c in (secure, plain):
            if not c.wait_ready(120):
                raise RuntimeError("a node did not join")
        clients = {"curve": Client(secure.context.client_endpoint, key=operator.path, idle_timeout=300),
                   "plain": Client(plain.context.client_endpoint, insecure=True, idle_timeout=300)}
        series: dict[str, list[float]] = {"curve": [], "plain": []}
        ids: dict[str, list[int]] = {}
        node_pid = {}
        node_cpu = {"curve": 0.0, "plain": 0.0}
        for name, client in clients.items():  # warm-up: cold load and the first forward
            _, ids[name] = _intervals(client, args.tokens)
            node_pid[name] = client.status()["nodes"][0]["pid"]
        for rep in range(args.reps):
            order = ("curve", "plain") if rep % 2 == 0 else ("plain", "curve")
            for name in order:
                cpu0 = _cpu_s(node_pid[name])
                intervals, got = _intervals(clients[name], args.tokens)
                node_cpu[name] += _cpu_s(node_pid[name]) - cpu0
                series[name].extend(intervals)
                assert got == ids[name], f"{name}: tokens differ between repetitions"
        for client in clients.values():
            client.close()
    finally:
        for c in (secure, plain):
            c.stop()
    if ids["curve"] != ids["plain"]:
        print("token ids differ with and without CURVE", file=sys.stderr)
        return 1
    rounds: dict[str, list[tuple[float, float]]] = {"curve": [], "plain": []}
    for i in range(10):  # alternating, so the machine's drift hits both
        for name in (("curve", "plain") if i % 2 == 0 else ("plain", "curve")):
            rounds[name].append(_echo_us(name == "curve", args.echoes // 10))
    echo = {k: statistics.median(w for w, _ in v) for k, v in rounds.items()}
    echo_cpu = {k: statistics.median(c for _, c in v) for k, v in rounds.items()}
    med = {k: statistics.median(v) * 1e3 for k, v in series.items()}
    report = {
        "command": "python benchmarks/bench_curve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
                   f"libzmq {zmq.zmq_version()}",
        "tokens": args.tokens, "reps": args.reps, "intervals_per_path": len(series["curve"]),
        "ms_per_token_median": {k: round(v, 4) for k, v in med.items()},
        "ms_per_token_mean": {k: round(statistics.mean(v) * 1e3, 4) for k, v in series.items()},
        "curve_minus_plain_ms": round(med["curve"] - med["plain"], 4),
        "ratio_curve_over_plain": round(med["curve"] / med["plain"], 4),
        "node_cpu_ms_per_token": {k: round(v / (args.reps * args.tokens) * 1e3, 4) for k, v in node_cpu.items()},
        "echo_round_trip_us": {k: round(v, 2) for k, v in echo.items()},
        "echo_ratio": round(echo["curve"] / echo["plain"], 3),
        "echo_cpu_us": {k: round(v, 2) for k, v in echo_cpu.items()},
        "echo_cpu_ratio": round(echo_cpu["curve"] / echo_cpu["plain"], 3),
        "token_ids_equal": True,
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
