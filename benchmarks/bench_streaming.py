"""Per-token streaming overhead of the cluster path against direct in-process generation.

    python benchmarks/bench_streaming.py [--tokens 256] [--reps 5] [--models tiny,small] [--json out.json]

For each model size, one run measures the same greedy generation two ways:

* direct: ``load_for_inference`` + ``Engine`` in this process, ``prefill`` then ``step`` per token;
  the inter-token time is the time between two consecutive ``step`` returns.
* cluster: ``sllm up TOPO --headless`` with one node and one ``cpu`` device, and
  ``Client.generate(...)`` here; the inter-token time is the time between two consecutive
  ``TokenEvent`` arrivals at the client (instance actor -> node IO thread -> ZeroMQ -> controller IO
  thread -> RouterActor -> ZeroMQ -> client).

Both sides run torch with the same number of intra-op threads (``--threads``, default 1): ``threads``
in the topology for the node, ``torch.set_num_threads`` here. Direct and cluster repetitions are
interleaved so that drift of the machine hits both alike. The first interval (prefill's token to the
first decoded one) is part of both series; the time to the first token is reported apart.

The overhead is ``median(cluster) - median(direct)`` in ms per token; the goal is < 0.5 ms. The token
ids of both paths must be equal (exit status 1 otherwise).

Where the time goes: during the measured cluster requests the on-CPU time, run-queue wait and context
switches of every thread of the controller, the node and this client are read from
``/proc/PID/task/TID/schedstat`` and reported per token; ``--profile DIR`` also records py-spy stacks
of the controller and node processes (``pip install py-spy``; it perturbs the timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import signal
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

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "layers": 2},
    "small": {"hidden_size": 256, "layers": 4},
}
PROMPTS = [
    "Once upon a time there was a small model",
    "The capital of France is",
    "Serverless inference starts models on demand",
    "Hello world, how are you today?",
    "Actors exchange messages over queues",
    "numbers 0 1 2 3 4 5 6 7 8 9",
]
NODE = "node-1"
GOAL_MS = 0.5


# ---------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


@dataclass
class Series:
    """One path's measurements over the repetitions of one model."""

    gaps_s: list[float] = field(default_factory=list)
    rep_medians_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    totals_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def add(self, times: list[float], ttft: float, total: float) -> None:
        rep = gaps(times)
        self.gaps_s += rep
        self.rep_medians_s.append(statistics.median(rep))
        self.ttfts_s.append(ttft)
        self.totals_s.append(total)
        self.tokens.append(len(times))

    def summary(self) -> dict[str, Any]:
        ms = [g * 1000.0 for g in self.gaps_s]
        return {
            "samples": len(ms),
            "median_ms": statistics.median(ms),
            "p90_ms": percentile(ms, 0.90),
            "p99_ms": percentile(ms, 0.99),
            "mean_ms": statistics.fmean(ms),
            "min_ms": min(ms),
            "rep_medians_ms": [m * 1000.0 for m in self.rep_medians_s],
            "tokens_per_s": 1000.0 / statistics.median(ms),
            "end_to_end_tokens_per_s": statistics.median([n / t for n, t in zip(self.tokens, self.totals_s)]),
            "ttft_median_ms": statistics.median(self.ttfts_s) * 1000.0,
        }


# ---------------------------------------------------------------------- direct path


class Direct:
    def __init__(self, path: Path) -> None:
        from sllm_actors.gpu.engine import Engine
        from sllm_actors.models import load_for_inference

        model, tok = load_for_inference(path, "cpu")
        self.engine = Engine(model, tok)
        self.cpu_s = 0.0
        self.cpu_tokens = 0

    def run(self, prompt: str, tokens: int) -> tuple[list[int], list[float], float, float]:
        """(token ids, time of each token, time to first token, total seconds).

        Adds this thread's CPU seconds of the decode loop after the first token to ``cpu_s``.
        """
        from sllm_actors.gpu.sequence import Sequence
        from sllm_actors.messages import SamplingParams

        engine = self.engine
        started = time.perf_counter()
        seq = Sequence(
            request_id="direct", prompt_ids=engine.tokenize(prompt, False), generated_ids=[],
            sampling=SamplingParams(max_tokens=tokens, seed=0),
        )
        engine.prefill(seq)
        ids: list[int] = []
        times: list[float] = []
        cpu_start = 0.0
        while True:
            token, _ = engine.step(seq)
            times.append(time.perf_counter())
            if not ids:
                cpu_start = time.thread_time()
            ids.append(token)
            if seq.finish_reason:
                break
        self.cpu_s += time.thread_time() - cpu_start
        self.cpu_tokens += len(ids) - 1
        return ids, times, times[0] - started, times[-1] - started


# ---------------------------------------------------------------------- cluster path


@dataclass
class Cluster:
    proc: subprocess.Popen[str]
    endpoint: str
    lines: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"warning: sllm up (pid {self.proc.pid}) did not stop within {timeout:.0f}s "
                      "of SIGTERM; killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()

    def node_pids(self) -> dict[str, int]:
        from sllm_actors.client import Client

        with Client(self.endpoint) as client:
            return {n["name"]: n["pid"] for n in client.status()["nodes"] if n["alive"]}


def write_topology(path: Path, models: dict[str, Path], threads: int) -> Path:
    """One node with one cpu device (the shape of tests/conftest.py's write_topology)."""
    import yaml

    data = {
        "controller": {"host": "127.0.0.1", "client_port": 0, "cluster_port": 0, "state_port": 0},
        "nodes": [{
            "name": NODE,
            "gpus": [{"device": "cpu", "memory": "2GiB"}],
            "threads": threads,
            "dram": {"capacity": "1GiB"},
            "ssd": {"path": str(path.parent / "ssd-1"), "capacity": "2GiB"},
        }],
        "models": [{"name": name, "source": str(src), "keep_alive": "30m"} for name, src in models.items()],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def start_cluster(topology: Path, timeout: float = 180.0) -> Cluster:
    from sllm_actors.runtime.security import keys_dir

    proc = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "up", str(topology), "--headless"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=topology.parent,
        env={**os.environ, "SLLM_HOME": str(topology.parent / "home"), "SLLM_LOG_LEVEL": "WARNING",
             "SLLM_KEYS": str(keys_dir())},  # where this process's client finds the operator key
    )
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                ready.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        line = ready.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        proc.wait()
        raise RuntimeError("sllm up did not print ready:\n" + "".join(lines[-50:])) from None
    words = line.split()
    return Cluster(proc, words[words.index("client") + 2], lines)


def run_cluster(
    client: Any, model: str, prompt: str, tokens: int
) -> tuple[list[int], list[float], float, float]:
    """(token ids, client-side arrival time of each token, time to first token, total seconds)."""
    from sllm_actors.client import Completion, TokenEvent

    ids: list[int] = []
    times: list[float] = []
    done: Completion | None = None
    started = time.perf_counter()
    for event in client.generate(model, prompt, max_tokens=tokens, temperature=0.0, seed=0):
        now = time.perf_counter()
        if isinstance(event, TokenEvent):
            # One chunk per token on this path; a chunk of several would hide per-token costs.
            times.extend([now] * len(event.token_ids))
            ids.extend(event.token_ids)
        elif isinstance(event, Completion):
            done = event
    assert done is not None, "the stream ended without a Completion"
    if done.token_ids != ids:
        raise AssertionError(f"{model}: streamed ids differ from the Completion's ids")
    return ids, times, times[0] - started, times[-1] - started


# ---------------------------------------------------------------------- where the CPU goes


def thread_times(pid: int) -> dict[str, list[float]]:
    """Per thread: "comm:tid" -> [on-CPU s, run-queue wait s, involuntary switches, voluntary switches].

    From /proc/PID/task/TID/{schedstat,status}. Python threads all read "python" in comm, hence the
    tid (``py-spy dump --pid PID`` names the Python thread of each tid).
    """
    out: dict[str, list[float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                name = f.read().strip()
            with open(f"{base}/schedstat") as f:
                run_ns, wait_ns, _ = (int(x) for x in f.read().split())
            vol = invol = 0
            with open(f"{base}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol = int(line.split()[1])
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        out[f"{name}:{tid}"] = [run_ns / 1e9, wait_ns / 1e9, float(invol), float(vol)]
    return out


class CpuMeter:
    """Sums per-thread deltas of several processes over the measured windows."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.totals: dict[str, list[float]] = {}
        self._before: dict[str, dict[str, list[float]]] = {}

    def start(self) -> None:
        self._before = {label: thread_times(pid) for label, pid in self.pids.items()}

    def stop(self) -> None:
        for label, pid in self.pids.items():
            before = self._before.get(label, {})
            for name, values in thread_times(pid).items():
                prev = before.get(name, [0.0, 0.0, 0.0, 0.0])
                acc = self.totals.setdefault(f"{label}/{name}", [0.0, 0.0, 0.0, 0.0])
                for i in range(4):
                    acc[i] += values[i] - prev[i]

    def per_token(self, tokens: int) -> dict[str, dict[str, float]]:
        rows = {
            name: {"cpu_ms": v[0] * 1000 / tokens, "runqueue_wait_ms": v[1] * 1000 / tokens,
                   "involuntary_switches": v[2] / tokens, "voluntary_switches": v[3] / tokens}
            for name, v in self.totals.items()
        }
        return dict(sorted(rows.items(), key=lambda kv: -kv[1]["cpu_ms"]))


def start_profilers(folder: Path, pids: dict[str, int], rate: int) -> list[subprocess.Popen[bytes]]:
    """py-spy record (raw collapsed stacks, per thread, idle samples kept) on each cluster process.

    Sampling costs CPU on a small machine: the timings of a profiled run are perturbed; use the
    profile for where the time goes, a run without --profile for the figures.
    """
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        raise SystemExit(f"--profile needs py-spy: {Path(sys.executable).parent / 'pip'} install py-spy")
    folder.mkdir(parents=True, exist_ok=True)
    procs = []
    for label, pid in pids.items():
        out = folder / f"{label}-{pid}.txt"
        procs.append(subprocess.Popen(
            [str(py_spy), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads",
             "--idle", "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        print(f"py-spy recording {label} (pid {pid}) into {out}", file=sys.stderr)
    time.sleep(1.0)  # let py-spy attach before the measured requests
    return procs


def stop_profilers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- the benchmark


def pick_prompt(direct: Direct, tokens: int) -> tuple[str, list[int]]:
    """A prompt whose greedy continuation does not hit EOS within ``tokens`` (random weights)."""
    best: tuple[str, list[int]] | None = None
    for prompt in PROMPTS:
        ids, *_ = direct.run(prompt, tokens)
        if len(ids) >= tokens:
            return prompt, ids
        if best is None or len(ids) > len(best[1]):
            best = (prompt, ids)
    assert best is not None
    return best


def measure(args: argparse.Namespace, name: str, path: Path, prompt: str, direct: Direct, client: Any,
            pids: dict[str, int]) -> dict[str, Any]:
    d, c = Series(), Series()
    direct.cpu_s, direct.cpu_tokens = 0.0, 0
    reference: list[int] | None = None
    ids_equal = True
    meter = CpuMeter({**pids, "client": os.getpid()})
    load_before = os.getloadavg()[0]
    for rep in range(args.reps):
        d_ids, times, ttft, total = direct.run(prompt, args.tokens)
        d.add(times, ttft, total)
        meter.start()
        c_ids, times, ttft, total = run_cluster(client, name, prompt, args.tokens)
        meter.stop()
        c.add(times, ttft, total)
        reference = reference or d_ids
        if c_ids != d_ids or d_ids != reference:
            ids_equal = False
            first = next((i for i, (a, b) in enumerate(zip(c_ids, d_ids)) if a != b),
                         min(len(c_ids), len(d_ids)))
            print(f"MISMATCH {name} rep {rep}: first difference at token {first} "
                  f"(direct {len(d_ids)} ids, cluster {len(c_ids)} ids)", file=sys.stderr)
    ds, cs = d.summary(), c.summary()
    threads = meter.per_token(sum(c.tokens))
    compute = max((t for k, t in threads.items() if k.startswith(f"{NODE}/")), key=lambda t: t["cpu_ms"],
                  default={"cpu_ms": float("nan")})
    direct_cpu_ms = 1000.0 * direct.cpu_s / max(1, direct.cpu_tokens)
    paired = [(cm - dm) * 1000.0 for cm, dm in zip(c.rep_medians_s, d.rep_medians_s)]
    return {
        "model": {**SIZES[name], "arch": "llama", "path": str(path)},
        "prompt": prompt,
        "tokens_per_request": len(reference or []),
        "reps": args.reps,
        "token_ids_equal": ids_equal,
        "direct": ds,
        "cluster": cs,
        "overhead_median_ms": cs["median_ms"] - ds["median_ms"],
        "overhead_p90_ms": cs["p90_ms"] - ds["p90_ms"],
        "overhead_mean_ms": cs["mean_ms"] - ds["mean_ms"],
        # Median over repetitions of (cluster median - direct median) of the adjacent pair: drift-proof.
        "overhead_paired_median_ms": statistics.median(paired),
        "ratio_median": cs["median_ms"] / ds["median_ms"],
        "goal_met": cs["median_ms"] - ds["median_ms"] < GOAL_MS,
        "loadavg_1m_before_after": [load_before, os.getloadavg()[0]],
        # CPU time is less sensitive than wall time to other load on a small machine.
        "compute_thread_cpu_ms_per_token": {
            "direct": direct_cpu_ms,
            "cluster_instance_thread": compute["cpu_ms"],
            "overhead": compute["cpu_ms"] - direct_cpu_ms,
        },
        "cluster_threads_per_token": threads,
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sllm_actors.client import Client
    from sllm_eval.tiny_models import make_tiny_model

    torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.models.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown model size {s!r}; choose from {', '.join(SIZES)}")

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cluster: Cluster | None = None
    pids: dict[str, int] = {}
    profilers: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {}
    try:
        paths = {
            s: make_tiny_model(workdir / "models" / f"{s}-llama", arch="llama", seed=0, **SIZES[s])
            for s in sizes
        }
        directs = {s: Direct(paths[s]) for s in sizes}
        prompts: dict[str, str] = {}
        for s in sizes:
            prompts[s], ids = pick_prompt(directs[s], args.tokens)
            if len(ids) < args.tokens:
                print(f"note: {s}: every prompt hits EOS early; using {len(ids)} tokens", file=sys.stderr)
        cluster = start_cluster(write_topology(workdir / "topology.yaml", paths, args.threads))
        with Client(cluster.endpoint, idle_timeout=300.0) as client:
            pids = {"controller": cluster.proc.pid, **cluster.node_pids()}
            print(f"cluster up at {cluster.endpoint}: pids {pids}", file=sys.stderr)
            for s in sizes:
                # Warm-up: the first request loads the model on the node; then both paths in full.
                started = time.perf_counter()
                run_cluster(client, s, prompts[s], 8)
                print(f"{s}: loaded on the node in {time.perf_counter() - started:.1f}s", file=sys.stderr)
                for _ in range(args.warmup):
                    run_cluster(client, s, prompts[s], args.tokens)
                    directs[s].run(prompts[s], args.tokens)
            if args.pause:
                print(f"pausing {args.pause:.0f}s before measuring (attach a profiler now)", file=sys.stderr)
                time.sleep(args.pause)
            if args.profile:
                profilers = start_profilers(Path(args.profile), pids, args.profile_rate)
            for s in sizes:
                results[s] = measure(args, s, paths[s], prompts[s], directs[s], client, pids)
    finally:
        stop_profilers(profilers)
        if cluster is not None:
            cluster.stop()
        for name, pid in pids.items():
            if name != "controller":
                deadline = time.monotonic() + 15
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _alive(pid):
                    print(f"warning: node {name} (pid {pid}) outlived sllm up; killing it", file=sys.stderr)
                    os.kill(pid, signal.SIGKILL)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "machine": machine(),
        "torch_threads": args.threads,
        "tokens": args.tokens,
        "reps": args.reps,
        "goal_overhead_ms": GOAL_MS,
        "results": results,
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu,
        "loadavg_at_end": list(os.getloadavg()), "python": platform.python_version(),
        "torch": torch.__version__, "platform": platform.platform(),
    }


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nstreaming overhead: {report['tokens']} tokens x {report['reps']} reps, torch threads "
          f"{report['torch_threads']}, {m['nproc']} cpus ({m['cpu']})")
    header = (f"{'model':<18} {'path':<8} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8} "
              f"{'tok/s':>7} {'e2e tok/s':>10} {'ttft ms':>8}")
    print(header)
    print("-" * len(header))
    for name, r in report["results"].items():
        label = f"{name} (h{r['model']['hidden_size']}, L{r['model']['layers']})"
        for path in ("direct", "cluster"):
            s = r[path]
            print(f"{label if path == 'direct' else '':<18} {path:<8} {s['median_ms']:>10.3f} "
                  f"{s['p90_ms']:>8.3f} {s['p99_ms']:>8.3f} {s['mean_ms']:>8.3f} {s['tokens_per_s']:>7.0f} "
                  f"{s['end_to_end_tokens_per_s']:>10.0f} {s['ttft_median_ms']:>8.1f}")
        verdict = "met" if r["goal_met"] else "NOT met"
        print(f"{'':<18} overhead {r['overhead_median_ms']:+.3f} ms/token median (paired per rep "
              f"{r['overhead_paired_median_ms']:+.3f}, p90 {r['overhead_p90_ms']:+.3f}, mean "
              f"{r['overhead_mean_ms']:+.3f}), ratio x{r['ratio_median']:.2f}: goal < "
              f"{report['goal_overhead_ms']} ms {verdict}")
        c = r["compute_thread_cpu_ms_per_token"]
        la = r["loadavg_1m_before_after"]
        print(f"{'':<18} compute thread CPU/token: direct {c['direct']:.3f} ms, instance actor "
              f"{c['cluster_instance_thread']:.3f} ms ({c['overhead']:+.3f}); token ids equal: "
              f"{r['token_ids_equal']}; load average {la[0]:.2f} -> {la[1]:.2f}")
    for name, r in report["results"].items():
        print(f"\ncluster path, {name}, per token and thread (under 0.005 ms left out):")
        print(f"  {'process/comm:tid':<36} {'cpu ms':>8} {'rq wait ms':>10} {'invol sw':>9} {'vol sw':>7}")
        for thread, t in r["cluster_threads_per_token"].items():
            if t["cpu_ms"] >= 0.005 or t["runqueue_wait_ms"] >= 0.005:
                print(f"  {thread:<36} {t['cpu_ms']:>8.3f} {t['runqueue_wait_ms']:>10.3f} "
                      f"{t['involuntary_switches']:>9.2f} {t['voluntary_switches']:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per request (default 256)")
    parser.add_argument("--reps", type=int, default=5, help="measured requests per path, model (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per path (default 1)")
    parser.add_argument("--models", default="tiny,small",
                        help="comma-separated: tiny (hidden 64, 2 layers), small (hidden 256, 4 layers)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both paths (default 1)")
    parser.add_argument("--workdir", default="", help="keep models and topology here (default: a temp dir)")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds to wait after warm-up before measuring (to attach py-spy by hand)")
    parser.add_argument("--profile", default="",
                        help="record py-spy raw stacks of the controller and node processes into this folder "
                             "during the measured requests (perturbs the timings)")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s (default 200)")
    parser.add_argument("--json", dest="json_out", default="", help="write the report as JSON to this file")
    args = parser.parse_args(argv)
    report = bench(args)
    print_table(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0 if all(r["token_ids_equal"] for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
