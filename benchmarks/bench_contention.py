"""When migration matters: a constructed contention scenario replayed per policy on a real cluster.

    python benchmarks/bench_contention.py [--policies serverlessllm,shepherd,locality-wait] [--rounds 3]
        [--a-size 50] [--b-size 400] [--a-tokens 300] [--b-after 200] [--json out.json]

Two nodes x 1 ``cpu`` device, each with room for one copy of the large model B or two copies of the small
model A, never for A and B together. A's checkpoint is on both nodes' SSD tiers, B's only on node-1's (the
repository, throttled, holds both). Every round starts from an empty cluster (instances gone after their
keep-alive), then:

* two long greedy generations of A (``--a-tokens``, the second 20 % more), sent together: they start on
  both nodes (two copies of A fit one device, so where each goes is the scheduler's choice; the run records it);
* a short request for B, sent when either A request has streamed ``--b-after`` tokens. No device has room for
  B; node-1, the only node holding B's checkpoint, is busy with one A request: the ``victim``; node-2 has
  room for a second A. The other A request is ``other``.

What each policy does then (``placement.choose``): ``serverlessllm`` migrates ``victim`` to a new A on
node-2 (token-based: it keeps generating on node-1 while node-2 recomputes its cache) and loads B on node-1
from its DRAM; ``shepherd`` preempts ``victim`` (it restarts from scratch on node-2, its tokens lost) and
loads B at once; ``locality-wait`` queues B until a device frees. A warm-up round (not measured) first puts
every checkpoint in its nodes' DRAM and pays each node process's first loads.

Reported per policy: latency and TTFT (client side, from each request's send) over all requests, by role,
and the scheduler's decisions, migrations and preemptions from the cluster's events, with the checks that the
expected decision was taken in every measured round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sllm_eval.replay import (
    PromptMaker,
    ReplayRecords,
    RequestRecord,
    _machine,
    _Watcher,
    make_model_family,
    print_table,
    seed_ssd_tiers,
    start_cluster,
    stop_cluster,
    summarize,
    write_bench_topology,
)
from sllm_eval.stats import REPLAY_POINTS, stats

EXPECTED = {"serverlessllm": "migrate", "shepherd": "preempt", "locality-wait": "wait"}
ROLES = ("victim", "other", "B")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_request(endpoint: str, rec: RequestRecord, prompt: str, t0: float, progress: threading.Event | None,
                 after_tokens: int, timeout_s: float) -> None:
    """Stream one request; set ``progress`` once ``after_tokens`` tokens have arrived."""
    from sllm_actors.client import Client, ClusterUnavailable, Completion, RequestError, TokenEvent

    start = time.monotonic()
    rec.arrival_s = start - t0
    seen = 0
    try:
        with Client(endpoint, idle_timeout=timeout_s) as client:
            for event in client.generate(rec.model, prompt, max_tokens=rec.output_tokens, temperature=0.0,
                                         request_id=rec.request_id or None):
                now = time.monotonic()
                if isinstance(event, TokenEvent):
                    rec.request_id = event.request_id
                    seen += len(event.token_ids)
                    if rec.ttft_s is None:
                        rec.ttft_s = now - start
                    if progress is not None and seen >= after_tokens:
                        progress.set()
                elif isinstance(event, Completion):
                    rec.request_id = event.request_id
                    rec.latency_s = now - start
                    rec.ttft_s = rec.latency_s if rec.ttft_s is None else rec.ttft_s
                    rec.server_ttft_s = event.ttft_s
                    rec.tokens = len(event.token_ids)
                    rec.prompt_tokens_seen = event.prompt_tokens
                    rec.finish_reason = event.finish_reason
                    rec.migrations = list(event.migrations)
    except RequestError as exc:
        rec.request_id = rec.request_id or exc.request_id
        rec.error_code, rec.error_message = exc.code, exc.message
    except ClusterUnavailable as exc:
        rec.error_code, rec.error_message = "unavailable", str(exc)
    if rec.error_code:
        rec.latency_s = time.monotonic() - start
    if progress is not None:
        progress.set()  # a failed victim must not hold B back forever


def _wait_empty(endpoint: str, timeout_s: float) -> bool:
    """Until the cluster has no instance (all unloaded after their keep-alive) and no migration."""
    from sllm_actors.client import Client

    deadline = time.monotonic() + timeout_s
    with Client(endpoint) as c:
        while time.monotonic() < deadline:
            st = c.status()
            if not st.get("instances") and not st.get("migrations"):
                return True
            time.sleep(0.5)
    return False


def run_policy(policy: str, args: argparse.Namespace, a_model: Any, b_model: Any, prompts: PromptMaker,
               work: Path) -> tuple[ReplayRecords, dict[str, str], list[dict[str, Any]]]:
    from sllm_actors.client import Client
    from sllm_actors.feed import reachable_state_endpoint

    topo = write_bench_topology(
        work / "topology.yaml", [a_model, b_model], policy=policy, keep_alive_s=args.keep_alive, nodes=2,
        gpu_models=1, dram_fraction=1.1, ssd_fraction=1.1, repository_bw=args.repository_bw * 1e6,
        ssd_bw=args.ssd_bw * 1e6, threads=1, target_concurrency=1, max_instances=3, queue_timeout_s=args.timeout,
        migration=True,
    )
    seed_ssd_tiers(work, [a_model], nodes=2, replicas=2)
    seed_ssd_tiers(work, [b_model], nodes=2, replicas=1)  # B: node-1 only
    say(f"[{policy}] starting a cluster in {work}")
    cluster = start_cluster(topo)
    records = ReplayRecords()
    rounds_roles: dict[str, str] = {}
    round_info: list[dict[str, Any]] = []
    try:
        with Client(cluster.endpoint) as probe:
            probe.status()
            state_endpoint = reachable_state_endpoint(probe.state_endpoint, cluster.endpoint)
        watcher = _Watcher(state_endpoint)
        watcher.start()
        t0 = time.monotonic()
        t0_wall = time.time()
        index = 0
        for rnd in range(args.rounds + 1):
            warm = rnd == 0
            t_round = time.time()
            a1 = RequestRecord(index, a_model.name, 0.0, args.prompt_tokens, args.a_tokens,
                               request_id=f"r{rnd}-a1-{policy}")
            a2 = RequestRecord(index + 1, a_model.name, 0.0, args.prompt_tokens, int(args.a_tokens * 1.2),
                               request_id=f"r{rnd}-a2-{policy}")
            b = RequestRecord(index + 2, b_model.name, 0.0, args.prompt_tokens, args.b_tokens,
                              request_id=f"r{rnd}-b-{policy}")
            index += 3
            progress = threading.Event()
            threads = [
                threading.Thread(target=_run_request, args=(cluster.endpoint, rec, prompts(args.prompt_tokens, salt),
                                                            t0, progress, args.b_after, args.timeout))
                for salt, rec in ((1, a1), (2, a2))
            ]
            threads[0].start()
            time.sleep(0.05)
            threads[1].start()
            progress.wait(args.timeout)
            # The victim: the A request running on the node that holds B's checkpoint when B is sent.
            with Client(cluster.endpoint) as c:
                where = {r: i.get("node") for i in c.status().get("instances", []) for r in i.get("requests", [])}
            victim, other = (a1, a2) if where.get(a1.request_id) == "node-1" or where.get(a2.request_id) != "node-1" \
                else (a2, a1)
            recs = {"victim": victim, "other": other, "B": b}
            tb = threading.Thread(target=_run_request, args=(cluster.endpoint, b, prompts(args.prompt_tokens, 3),
                                                             t0, None, 0, args.timeout))
            tb.start()
            threads.append(tb)
            for t in threads:
                t.join()
            label = "warm-up" if warm else f"round {rnd}"
            say(f"[{policy}] {label}: A on " + ", ".join(f"{k}: {v}" for k, v in where.items()) + "; " + ", ".join(
                f"{role} {r.latency_s:.1f}s ({r.tokens} tok{', ' + r.error_code if r.error_code else ''})"
                for role, r in recs.items() if r.latency_s is not None))
            if not warm:
                for role, r in recs.items():
                    records.append(r)
                    rounds_roles[str(r.index)] = role
                round_info.append({"round": rnd, "start_wall": t_round, "end_wall": time.time(), "placed_at_b": where,
                                   "request_ids": {role: r.request_id for role, r in recs.items()}})
            if not _wait_empty(cluster.endpoint, args.keep_alive + 30):
                say(f"[{policy}] the cluster did not empty after {label}; the next round starts anyway")
        records.duration_s = time.monotonic() - t0
        with Client(cluster.endpoint) as c:
            watcher.offer_status(c.status())
        watcher.stop()
        first_measured = round_info[0]["start_wall"] if round_info else t0_wall
        records.events = sorted((e for e in watcher.events if e["time"] >= first_measured - 0.5),
                                key=lambda e: e["time"])
        records.busy_s, records.loading_s = watcher.occupancy(first_measured - 0.5)
        records.label = policy
    finally:
        stop_cluster(cluster)
    return records, rounds_roles, round_info


def check_rounds(policy: str, records: ReplayRecords, roles: dict[str, str],
                 round_info: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per measured round: the scheduler's decision for B, and what happened to the victim."""
    out = []
    for info in round_info:
        events = [e for e in records.events if info["start_wall"] - 0.5 <= e["time"] <= info["end_wall"] + 0.5]
        b_id = info["request_ids"]["B"]
        victim_id = info["request_ids"]["victim"]
        decisions = [(e.get("data") or {}).get("decision") for e in events
                     if e["kind"] == "schedule" and (e.get("data") or {}).get("request_id") == b_id]
        victim = next(r for r in records if r.request_id == victim_id)
        kinds = [m.get("kind") for m in victim.migrations]
        migr = [e["text"] for e in events if e["kind"] == "migrate"]
        b_rec = next(r for r in records if r.request_id == b_id)
        out.append({
            "round": info["round"], "b_decisions": decisions,
            "expected": EXPECTED.get(policy), "taken": EXPECTED.get(policy) in decisions,
            "victim_records": kinds, "victim_tokens": victim.tokens, "migrate_events": migr,
            "b_tier": next(((e.get("data") or {}).get("tier") for e in events
                            if e["kind"] == "load" and (e.get("data") or {}).get("model") == b_rec.model), None),
            "b_node": next(((e.get("data") or {}).get("node") for e in events
                            if e["kind"] == "load" and (e.get("data") or {}).get("model") == b_rec.model), None),
        })
    return out


def role_table(results: dict[str, ReplayRecords], roles: dict[str, dict[str, str]]) -> list[str]:
    lines = [("| policy | all: mean / p50 / p99 / max latency | victim (A) latency mean / max | other (A) mean / max "
              "| B latency mean / max | B TTFT mean | migrations | preemptions | expected decision |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for policy, recs in results.items():
        s = summarize(recs)
        lat = s["latency_all_s"]

        def role(name: str, key: str = "latency_s", recs: ReplayRecords = recs, policy: str = policy) -> dict[str, Any]:
            return stats([getattr(r, key) for r in recs if roles[policy][str(r.index)] == name
                          and getattr(r, key) is not None], REPLAY_POINTS)

        v, o, b, bt = role("victim"), role("other"), role("B"), role("B", "ttft_s")
        checks = getattr(recs, "checks", [])
        taken = sum(1 for c in checks if c["taken"])
        lines.append(
            f"| {policy} | {lat['mean']:.2f} / {lat['p50']:.2f} / {lat['p99']:.2f} / {lat['max']:.2f} "
            f"| {v['mean']:.2f} / {v['max']:.2f} | {o['mean']:.2f} / {o['max']:.2f} | {b['mean']:.2f} / {b['max']:.2f} "
            f"| {bt['mean']:.2f} | {s['migrations']['ordered']} ({s['migrations']['outcomes'].get('done', 0)} done) "
            f"| {s['preemptions']} ({s['requests_restarted']} restarted) "
            f"| {EXPECTED.get(policy, '-')} in {taken}/{len(checks)} rounds |")
    return lines


def ratios(results: dict[str, ReplayRecords], roles: dict[str, dict[str, str]]) -> dict[str, dict[str, float]]:
    base = results.get("serverlessllm")
    if base is None:
        return {}
    out = {}

    def figures(policy: str, recs: ReplayRecords) -> dict[str, float]:
        lat = [r.latency_s for r in recs if r.latency_s is not None]
        victims = [r.latency_s for r in recs if roles[policy][str(r.index)] == "victim" and r.latency_s is not None]
        s, v = stats(lat, REPLAY_POINTS), stats(victims, REPLAY_POINTS)
        return {"p99": s["p99"], "max": s["max"], "mean": s["mean"], "victim_mean": v["mean"], "victim_max": v["max"]}

    mine = figures("serverlessllm", base)
    for policy, recs in results.items():
        if policy == "serverlessllm":
            continue
        theirs = figures(policy, recs)
        out[policy] = {k: theirs[k] / mine[k] for k in mine if mine[k] and theirs[k] is not None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="serverlessllm,shepherd,locality-wait")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    p.add_argument("--a-size", type=float, default=50, help="MB of model A (the long generations)")
    p.add_argument("--b-size", type=float, default=400, help="MB of model B (needs a whole device)")
    p.add_argument("--a-tokens", type=int, default=300, help="tokens of the first A request (the second asks 1.2x)")
    p.add_argument("--b-tokens", type=int, default=16)
    p.add_argument("--b-after", type=int, default=200, help="B is sent when an A request has streamed this many tokens")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--keep-alive", type=float, default=2.0)
    p.add_argument("--repository-bw", type=float, default=60, help="MB/s")
    p.add_argument("--ssd-bw", type=float, default=300, help="MB/s")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family-dir", default=None, help="where the model family is cached ($SLLM_HOME/family)")
    p.add_argument("--work-dir", default=None, help="keep each cluster's topology, logs and tiers here")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    if not 0 < args.b_after < args.a_tokens:
        p.error("--b-after must be between 0 and --a-tokens")

    from sllm_actors.models import default_model_dir, sllm_home

    started = time.monotonic()
    family_dir = Path(args.family_dir).expanduser() if args.family_dir else sllm_home() / "family"
    a_model, b_model = make_model_family(family_dir, [args.a_size, args.b_size], seed=args.seed, say=say)
    say(f"A = {a_model.name} ({a_model.bytes / 1e6:.0f} MB), B = {b_model.name} ({b_model.bytes / 1e6:.0f} MB)")
    tokenizer = None
    if (default_model_dir() / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    prompts = PromptMaker(tokenizer)

    results: dict[str, ReplayRecords] = {}
    roles: dict[str, dict[str, str]] = {}
    checks: dict[str, list[dict[str, Any]]] = {}
    loads: dict[str, Any] = {}
    for policy in [x for x in args.policies.split(",") if x]:
        load_before = os.getloadavg()[0]
        if args.work_dir:
            work = Path(args.work_dir).expanduser() / policy
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(tempfile.mkdtemp(prefix=f"sllm-contention-{policy}-"))
        recs, rr, info = run_policy(policy, args, a_model, b_model, prompts, work)
        recs.checks = check_rounds(policy, recs, rr, info)  # type: ignore[attr-defined]
        results[policy], roles[policy], checks[policy] = recs, rr, recs.checks  # type: ignore[attr-defined]
        loads[policy] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
        for c in recs.checks:  # type: ignore[attr-defined]
            say(f"[{policy}] round {c['round']}: B decisions {c['b_decisions']} (expected {c['expected']}: "
                f"{'yes' if c['taken'] else 'NO'}), victim records {c['victim_records']}, "
                f"B loaded on {c['b_node']} from {c['b_tier']}")

    summaries = {policy: summarize(recs) for policy, recs in results.items()}
    print_table(summaries)
    for line in role_table(results, roles):
        print(line)
    rat = ratios(results, roles)
    for policy, r in rat.items():
        print(f"{policy} / serverlessllm: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    runtime = time.monotonic() - started
    machine = _machine()
    print(f"runtime {runtime:.0f}s on {machine['host']} ({machine['cpus']} cpus, {machine.get('cpu', platform.machine())}); "
          "1-min load average per policy (before/after): " + ", ".join(f"{p} {v['before']}/{v['after']}" for p, v in loads.items()))
    if args.json_out:
        payload = {
            "args": vars(args), "runtime_s": runtime, "machine": machine, "loadavg_1m": loads,
            "models": {"A": {**asdict(a_model), "path": str(a_model.path)}, "B": {**asdict(b_model), "path": str(b_model.path)}},
            "summaries": summaries, "ratios": rat, "checks": checks, "roles": roles,
            "records": {p: [asdict(r) for r in recs] for p, recs in results.items()},
            "events": {p: recs.events for p, recs in results.items()},
        }
        Path(args.json_out).write_text(json.dumps(payload, indent=1, default=str))
        say(f"json: {args.json_out}")
    all_taken = all(c["taken"] for cs in checks.values() for c in cs)
    if not all_taken:
        say("note: the expected decision was not taken in every round (see the checks above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
