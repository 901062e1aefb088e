"""Takeover time of the standby controller: the leader's host killed under load, until the standby serves.

    .venv/bin/python benchmarks/bench_takeover.py [--streams 6] [--runs 2] [--lease-ttl 2] [--max-tokens 240]
                                                  [--json OUT]

Per run, a fresh cluster on loopback (``sllm_eval.standby_cluster``): etcd started here (its own ports, a temporary
data directory, authentication on), ``sllm up --controller ctl-a`` (leads) and ``--controller ctl-b`` (stands by),
two CPU nodes joined to both, the tests' slow model (a random-weight Llama of 6 layers, hidden 384: about 10 ms a
token on one thread, ``deterministic: true``, fp32). First each prompt once undisturbed (the reference tokens), then
``--streams`` greedy ZeroMQ streams given both controllers' endpoints; once every stream has tokens, every process of
ctl-a's ``sllm up`` is SIGKILLed (its host dies). Measured from the kill:

- ``lead_s``: until ctl-b says it leads (it won the etcd lease: at most the lease's TTL, plus its 0.2 s poll);
- ``ready_s``: until ctl-b's ``sllm up`` prints ``ready:`` (its registry has both nodes alive again; ``sllm up`` polls
  for it every 0.5 s, so this may come after the streams resumed: a node's requests resume as soon as its
  re-registration is adopted);
- ``resumed_s``: until every stream has had a token again (the last stream to resume: the clients' failover);
- ``lost``: streams that failed, or whose tokens differ from the reference (lost, repeated or changed).

Goal (issue 22): resumed within 5 s, 0 ZeroMQ streams lost. Prints one line per run and the medians; exit status 1
when a stream is lost. Needs Debian's ``etcd-server``. About 2 minutes a run on 2 cores; figures belong in RESULTS.md
only from a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sllm_actors.client import Client, Completion, TokenEvent
from sllm_eval.standby_cluster import StandbyCluster, etcd_missing
from sllm_eval.tiny_models import make_tiny_model

PROMPTS = ["The history of the river", "Once upon a time in a", "A list of the planets:", "In the beginning the",
           "The recipe calls for", "Our ship sailed north"]


class Stream(threading.Thread):
    def __init__(self, endpoints: str, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.endpoints, self.prompt, self.max_tokens = endpoints, prompt, max_tokens
        self.tokens: list[int] = []
        self.arrivals: list[float] = []
        self.done: Completion | None = None
        self.error: BaseException | None = None
        self.flowing = threading.Event()

    def run(self) -> None:
        try:
            with Client(self.endpoints, idle_timeout=120, connect_timeout=30) as client:
                for event in client.generate("slow", self.prompt, max_tokens=self.max_tokens, temperature=0.0):
                    if isinstance(event, TokenEvent):
                        self.tokens += event.token_ids
                        self.arrivals.append(time.monotonic())
                        self.flowing.set()
                    elif isinstance(event, Completion):
                        self.done = event
        except BaseException as exc:  # noqa: BLE001 - counted as a lost stream
            self.error = exc
        finally:
            self.flowing.set()


def one_run(work: Path, model: Path, streams: int, max_tokens: int, lease_ttl: int) -> dict[str, Any]:
    cluster = StandbyCluster(work, {"slow": {"source": str(model), "keep_alive": "5m", "deterministic": True,
                                             "target_concurrency": 8, "dtype": "float32"}}, model.parent,
                             lease_ttl=lease_ttl)
    try:
        cluster.start()
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
        with Client(cluster.endpoints, connect_timeout=30) as client:
            reference = {p: client.complete("slow", p, max_tokens=max_tokens, temperature=0.0).token_ids
                         for p in set(prompts)}
        running = [Stream(cluster.endpoints, p, max_tokens) for p in prompts]
        for s in running:
            s.start()
        for s in running:
            s.flowing.wait(120)
        killed = cluster.kill_host("ctl-a")
        _, led = cluster.procs["ctl-b"].wait_line("controller leading: ctl-b", 60)
        _, ready = cluster.procs["ctl-b"].wait_line("ready:", 120)
        for s in running:
            s.join(300)
        resumed = [next((t for t in s.arrivals if t > killed), float("nan")) for s in running]
        lost = sum(1 for s in running if s.error is not None or s.done is None or s.tokens != reference[s.prompt])
        before = [sum(1 for t in s.arrivals if t <= killed) for s in running]
        return {"lead_s": led - killed, "ready_s": ready - killed, "resumed_s": max(resumed) - killed,
                "lost": lost, "streams": streams, "tokens_before_kill": before,
                "errors": [repr(s.error) for s in running if s.error is not None]}
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--lease-ttl", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=240)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if etcd_missing():
        print(f"cannot run: {etcd_missing()}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="sllm-takeover-"))
    os.environ.setdefault("SLLM_KEYS", str(root / "keys"))
    model = make_tiny_model(root / "models" / "slow-llama", arch="llama", seed=7, hidden_size=384, layers=6)
    runs = []
    for i in range(args.runs):
        work = root / f"run-{i}"
        work.mkdir()
        r = one_run(work, model, args.streams, args.max_tokens, args.lease_ttl)
        runs.append(r)
        print(f"run {i + 1}: leads after {r['lead_s']:.2f}s, ready (both nodes alive) after {r['ready_s']:.2f}s, "
              f"every stream resumed after {r['resumed_s']:.2f}s, {r['lost']}/{r['streams']} streams lost", flush=True)
    summary = {key: statistics.median(r[key] for r in runs) for key in ("lead_s", "ready_s", "resumed_s")}
    lost = sum(r["lost"] for r in runs)
    print(f"median over {len(runs)} run(s), lease TTL {args.lease_ttl}s: leads {summary['lead_s']:.2f}s, ready "
          f"{summary['ready_s']:.2f}s, resumed {summary['resumed_s']:.2f}s; {lost} stream(s) lost "
          f"(goal: resumed within 5 s, 0 lost)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median": summary, "lost": lost,
                                               "lease_ttl_s": args.lease_ttl, "streams": args.streams,
                                               "cores": os.cpu_count()}, indent=2))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
