"""Throughput and time to first token through the OpenAI HTTP API against the ZeroMQ client, same run.

    python benchmarks/bench_http.py [--streams 1,32,128] [--tokens 64] [--reps 3] [--json out.json]

One cluster (`sllm up --headless`, two CPU nodes, a tiny random-weight Llama so the engine is cheap and the
serving path's cost shows) serves both sides:

* zmq: the native protocol, from one asyncio DEALER shared by every stream (``RouterLink``, the cheapest
  client of the router; the HTTP front end uses the same one, so the difference is the HTTP hop);
* http: ``POST /v1/chat/completions`` with ``stream: true``, one connection per stream, from aiohttp (vLLM's
  ``benchmark_serving`` client; ``--client httpx`` for the one the ``openai`` package uses), SSE read line by
  line; tokens counted from ``stream_options.include_usage``.

Per round it also reads the CPU time of every process (controller, nodes, the HTTP server, this client) from
/proc and reports microseconds per token: on a machine whose cores the engine needs, every cycle the serving
path spends is a cycle decoding does not get, and this says whose they were.

Every stream sends the same chat prompt with greedy decoding and ``max_tokens`` tokens (the engine may stop
earlier at EOS; both sides count what came). Per concurrency level the two sides alternate (zmq, http, zmq,
...) ``--reps`` times so that drift of a shared machine hits both; the medians are reported. Throughput is
total tokens / wall time of a round; TTFT is from a stream's send to its first token (for http: its first
SSE event, which carries the first token). Goal: http >= 90 % of zmq tok/s and <= 2 ms added TTFT p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPT = "Once upon a time there was a small model"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster(workdir: Path, model_dir: Path, threads: int) -> tuple[subprocess.Popen[str], str, str]:
    import yaml

    topo = {
        "controller": {"host": "127.0.0.1", "client_port": 0, "cluster_port": 0, "state_port": 0,
                       "http_port": free_port()},
        "nodes": [{"name": f"node-{i}", "gpus": [{"device": "cpu", "memory": "2GiB"}], "threads": threads,
                   "dram": {"capacity": "1GiB"}, "ssd": {"path": str(workdir / f"ssd-{i}"), "capacity": "2GiB"}}
                  for i in (1, 2)],
        "models": [{"name": "tiny", "source": str(model_dir), "keep_alive": "30m"}],
    }
    path = workdir / "topology.yaml"
    path.write_text(yaml.safe_dump(topo))
    # This process's ZeroMQ side is an operator of the cluster it starts: it finds the keys `sllm up` makes
    # under the same $SLLM_HOME (without them CURVE refuses its handshake and it retries forever).
    os.environ["SLLM_HOME"] = str(workdir / "home")
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "up", str(path), "--headless"], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "SLLM_LOG_LEVEL": "WARNING"})
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if line.startswith("ready:"):
            words = line.split()
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, words[words.index("client") + 2], words[words.index("http") + 2]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("sllm up did not print ready")


MIN_ROUND_TOKENS = 4096
"""Each stream sends requests one after another until the round has made about this many tokens, so a
round at 1 stream lasts long enough to time (and to read CPU time at the kernel's 10 ms tick)."""


def per_stream(streams: int, tokens: int) -> int:
    return max(1, -(-MIN_ROUND_TOKENS // (streams * tokens)))


async def _streams_of(one: Any, streams: int, tokens: int) -> dict[str, Any]:
    """``streams`` concurrent streams, each running ``one()`` (a request: (TTFT, tokens)) one after another."""
    async def serial() -> list[tuple[float, int]]:
        return [await one() for _ in range(per_stream(streams, tokens))]

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*[serial() for _ in range(streams)]) for r in rs]
    wall = time.perf_counter() - t0
    return _summary(results, wall)


async def zmq_round(link: Any, streams: int, tokens: int) -> dict[str, Any]:
    from sllm_actors.messages import ErrorReply, GenerateDone, GenerateRequest, TokenChunk

    async def one() -> tuple[float, int]:
        req = GenerateRequest(request_id=f"bench-{uuid.uuid4().hex[:12]}", model="tiny", prompt=PROMPT,
                              max_tokens=tokens, temperature=0.0, chat=True)
        group = link.open([req])
        t0 = time.perf_counter()
        await group.send()
        ttft = None
        n = 0
        while not group.finished:
            _, msg = await group.next(300)
            if isinstance(msg, TokenChunk) and ttft is None:
                ttft = time.perf_counter() - t0
            elif isinstance(msg, GenerateDone):
                n = len(msg.token_ids)
            elif isinstance(msg, ErrorReply):
                raise RuntimeError(msg.message)
        assert ttft is not None
        return ttft, n

    return await _streams_of(one, streams, tokens)


async def http_round(client: Any, base: str, streams: int, tokens: int) -> dict[str, Any]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    url = f"{base}/v1/chat/completions"

    def parse(line: str, state: dict[str, Any]) -> bool:
        if not line.startswith("data: "):
            return False
        if state["ttft"] is None:
            state["ttft"] = time.perf_counter() - state["t0"]
        if line.startswith("data: [DONE]"):
            return True
        if '"usage":{' in line:  # only the last event; the zmq side decodes no JSON either
            state["n"] = json.loads(line[6:])["usage"]["completion_tokens"]
        return False

    async def one() -> tuple[float, int]:
        state: dict[str, Any] = {"t0": time.perf_counter(), "ttft": None, "n": 0}
        if hasattr(client, "ws_connect"):  # aiohttp: what vLLM's benchmark_serving uses
            async with client.post(url, json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                async for raw in r.content:
                    if parse(raw.decode().rstrip("\n"), state):
                        break
        else:  # httpx: what the openai package uses
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
                async for line in r.aiter_lines():
                    if parse(line, state):
                        break
        assert state["ttft"] is not None
        return state["ttft"], state["n"]

    return await _streams_of(one, streams, tokens)


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """user + system CPU seconds of each named group of processes (every thread), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, group in pids.items():
        total = 0.0
        for pid in group:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
        out[name] = total
    return out


def process_groups(up_pid: int) -> dict[str, list[int]]:
    children, cmd = [], {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == up_pid:
                children.append(int(entry.name))
                cmd[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    return {
        "controller": [up_pid],
        "nodes": [p for p in children if "sllm_actors.actors.node.process" in cmd[p]],
        "http_server": [p for p in children if "sllm_actors.http" in cmd[p]],
        "bench_client": [os.getpid()],
    }


def _summary(results: list[tuple[float, int]], wall: float) -> dict[str, Any]:
    ttfts = [r[0] for r in results]
    total = sum(r[1] for r in results)
    return {"tokens": total, "wall_s": wall, "tok_s": total / wall, "ttft_p50_ms": percentile(ttfts, 0.5) * 1e3,
            "ttft_p90_ms": percentile(ttfts, 0.9) * 1e3}


async def run(args: argparse.Namespace, client_ep: str, base: str) -> dict[str, Any]:
    import httpx

    from sllm_actors.http.bridge import RouterLink

    link = RouterLink(client_ep)
    await link.start()
    out: dict[str, Any] = {}
    if args.client == "aiohttp":
        import aiohttp

        session: Any = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=600))
    else:
        session = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1024,
                                                                     max_keepalive_connections=1024))
    async with session as client:
        # Warm-up at the highest concurrency: the scheduler scales out (cold starts) here, not in a round.
        top = max(args.streams)
        for _ in range(2):
            await zmq_round(link, top, args.tokens)
            await http_round(client, base, top, args.tokens)
        for streams in args.streams:
            rounds: dict[str, list[dict[str, Any]]] = {"zmq": [], "http": []}
            for rep in range(args.reps):
                # Alternate which goes first, so neither always follows the other.
                order = ("zmq", "http") if rep % 2 == 0 else ("http", "zmq")
                for side in order:
                    before = cpu_seconds(args.pids)
                    if side == "zmq":
                        r = await zmq_round(link, streams, args.tokens)
                    else:
                        r = await http_round(client, base, streams, args.tokens)
                    after = cpu_seconds(args.pids)
                    # CPU time per token of each process: where a shared 2-core machine's cycles went.
                    for name in after:
                        r[f"cpu_us_per_token_{name}"] = (after[name] - before[name]) / max(r["tokens"], 1) * 1e6
                    rounds[side].append(r)
            keys = ["tok_s", "ttft_p50_ms", "ttft_p90_ms"] + [f"cpu_us_per_token_{n}" for n in args.pids]
            med = {side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in rounds.items()}
            med["ratio_tok_s"] = med["http"]["tok_s"] / med["zmq"]["tok_s"]  # type: ignore[assignment]
            med["added_ttft_p50_ms"] = med["http"]["ttft_p50_ms"] - med["zmq"]["ttft_p50_ms"]  # type: ignore[assignment]
            out[str(streams)] = {"median": med, "rounds": rounds}
            z, h = med["zmq"], med["http"]
            print(f"{streams:4d} streams  zmq {z['tok_s']:8.1f} tok/s ttft p50 {z['ttft_p50_ms']:7.2f} ms   "
                  f"http {h['tok_s']:8.1f} tok/s ttft p50 {h['ttft_p50_ms']:7.2f} ms   "
                  f"ratio {med['ratio_tok_s']:.3f}  added ttft {med['added_ttft_p50_ms']:+.2f} ms", flush=True)
            for side in ("zmq", "http"):
                print(f"      cpu us/token ({side}): " + "  ".join(
                    f"{n} {med[side][f'cpu_us_per_token_{n}']:.0f}" for n in args.pids), flush=True)
    await link.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,32,128")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp",
                        help="HTTP client of the load generator (aiohttp: vLLM's benchmark_serving's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    from sllm_eval.tiny_models import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "tiny", arch="llama", seed=0)
        proc, client_ep, base = start_cluster(work, model, args.threads)
        args.pids = process_groups(proc.pid)
        try:
            results = asyncio.run(run(args, client_ep, base))
        finally:
            proc.terminate()
            proc.wait(60)
    info = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus", "python": sys.version.split()[0],
            "tokens": args.tokens, "reps": args.reps, "client": args.client, "load_avg": os.getloadavg(),
            "results": results}
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
