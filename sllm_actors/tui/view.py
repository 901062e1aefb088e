"""Pure functions from the cluster's status dict (and its events) to what the TUI draws.

Kept free of Textual so they are easy to test, and tolerant: the status grows new keys over time
(migrations, node states), and an older or newer controller may lack some, so every read has a default.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from rich.text import Text

from sllm_actors.feed import Event

__all__ = [
    "Cells",
    "EventMemory",
    "Item",
    "TreeLine",
    "bar",
    "event_text",
    "fmt_bytes",
    "load_parts_line",
    "migration_rows",
    "node_state",
    "pick_migration_target",
    "request_rows",
    "resource_rows",
    "tree_lines",
    "where",
]

STATE_STYLES: dict[str, str] = {
    "running": "bold green",
    "ready": "green",
    "idle": "dim green",
    "loading": "bold yellow",
    "starting": "yellow",
    "placing": "yellow",
    "queued": "yellow",
    "resuming": "bold magenta",
    "migrating": "bold magenta",
    "unloading": "dim",
    "restarting": "bold yellow",
    "dead": "bold red",
    "failed": "bold red",
    "loading destination": "yellow",
    # what keeps work off a GPU or node (policy/health.py)
    "breaker open": "bold red",
    "breaker half-open": "bold yellow",
    "unhealthy": "bold red",
    "cordoned": "bold yellow",
    "draining": "bold magenta",
}

EVENT_STYLES: dict[str, str] = {
    "start": "green",
    "node": "green",
    "schedule": "blue",
    "load": "cyan",
    "unload": "dim",
    "store": "dim cyan",
    "deploy": "blue",
    "resume": "magenta",
    "migrate": "bold magenta",
    "migration": "bold magenta",
    "kill": "bold red",
    "crash": "bold red",
    "error": "red",
    "restart": "bold yellow",
    "health": "bold yellow",
    "tui": "italic",
    "tui-error": "bold red",
}

CONTROLLER_ACTORS = ("registry", "scheduler", "router")
"""The controller's supervised children (besides one process actor per local node)."""


# ----------------------------------------------------------------------------- small formatters


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_bandwidth(bytes_per_s: float) -> str:
    if not bytes_per_s:
        return "-"
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{bytes_per_s / 1e6:.0f} MB/s"


def bar(used: float, total: float, width: int = 12) -> Text:
    """A fill bar; green, then yellow above 70 %, red above 90 %. An unknown total draws no bar."""
    if total <= 0:
        return Text("─" * width + "    -", style="dim")
    fraction = min(max(used / total, 0.0), 1.0)
    filled = round(fraction * width)
    style = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    text = Text("█" * filled, style=style)
    text.append("░" * (width - filled), style="dim")
    text.append(f" {fraction * 100:3.0f}%")
    return text


def state_text(state: str) -> Text:
    return Text(state or "?", style=STATE_STYLES.get(state, ""))


def where(node: str, instance_id: str = "") -> str:
    if not node:
        return "-"
    return f"{node}/{instance_id}" if instance_id else node


def event_text(event: Event) -> Text:
    clock = time.strftime("%H:%M:%S", time.localtime(event.time))
    line = Text(f"{clock} ", style="dim")
    line.append(f"{event.kind:<9}", style=EVENT_STYLES.get(event.kind, "bold"))
    line.append(" " + event.text)
    return line


# ----------------------------------------------------------------------------- what events tell us


@dataclass
class Sample:
    time: float
    value: float


class EventMemory:
    """What the status does not say but the events do: actor restarts, nodes being restarted, load times.

    Counts start when this TUI attached (plus the snapshot's recent history), so they are "seen" counts.
    """

    def __init__(self, keep: int = 120) -> None:
        self.actor_restarts: Counter[tuple[str, str]] = Counter()
        """(node or "controller", child name) -> restarts seen."""
        self.restart_pending: set[str] = set()
        """Nodes whose process actor announced a restart that has not joined yet."""
        self.load_times: deque[Sample] = deque(maxlen=keep)
        self.throughput: deque[Sample] = deque(maxlen=keep)
        self.last_load: dict[str, Any] = {}
        """The last load event's data: model, tier, seconds and its parts (where the time went)."""

    def observe(self, event: Event) -> None:
        node = str(event.data.get("node", ""))
        child = str(event.data.get("child", ""))
        if event.kind == "restart":
            if child:
                self.actor_restarts[(node or "controller", child)] += 1
            elif node:
                self.restart_pending.add(node)
        elif event.kind == "node" and node and "joined" in event.text:
            self.restart_pending.discard(node)
        elif event.kind == "load":
            seconds = event.data.get("seconds")
            if isinstance(seconds, (int, float)):
                self.load_times.append(Sample(event.time, float(seconds)))
                self.last_load = dict(event.data)

    def observe_status(self, status: dict[str, Any]) -> None:
        total = sum(float(r.get("tokens_per_s", 0.0) or 0.0) for r in status.get("requests", []))
        self.throughput.append(Sample(float(status.get("time", time.time())), total))

    def restarts_of(self, node: str, child: str) -> int:
        return self.actor_restarts.get((node, child), 0)


def load_parts_line(last_load: dict[str, Any], limit: int = 5) -> str:
    """The last load's biggest serial parts: ``smol from dram 0.41s: read_wait 0.21 · build 0.09 · ...``."""
    from sllm_actors.actors.node.storage_client import SERIAL_PARTS

    if not last_load:
        return ""
    parts = last_load.get("parts") or {}
    shown = sorted(((float(v), k) for k, v in parts.items() if k in SERIAL_PARTS and isinstance(v, (int, float))),
                   reverse=True)[:limit]
    head = f"{last_load.get('model', '?')} from {last_load.get('tier', '?')} {float(last_load.get('seconds', 0)):.2f}s"
    return head + (": " + " · ".join(f"{k} {v:.2f}" for v, k in shown) if shown else "")


# ----------------------------------------------------------------------------- derived states


def node_state(node: dict[str, Any], memory: EventMemory) -> str:
    if node.get("state"):
        return str(node["state"])
    if node.get("alive"):
        return "running" if node.get("ready", True) else "starting"
    return "restarting" if node.get("name") in memory.restart_pending else "dead"


def instance_state(instance: dict[str, Any]) -> str:
    state = str(instance.get("state", "?"))
    if state == "ready":
        # The scheduler says "ready"; what an operator wants to see is whether it is working.
        return "running" if instance.get("requests") else "idle"
    return state


def gpu_state(instances: list[dict[str, Any]]) -> str:
    """A GPU is as busy as its busiest instance: loading or migrating first, then running, else idle."""
    states = {instance_state(i) for i in instances}
    return next((s for s in ("loading", "migrating", "running") if s in states), "idle")


def gpu_label(gpu: dict[str, Any]) -> str:
    return f"{gpu.get('node', '?')}/gpu-{gpu.get('index', '?')}"


def pick_migration_target(request: dict[str, Any], status: dict[str, Any]) -> str | None:
    """Another node's GPU for a request: the one with the most free memory on a node that is up.

    None when the request is not placed or there is no other node to go to.
    """
    source = request.get("node")
    if not source:
        return None
    up = {n.get("name") for n in status.get("nodes", []) if n.get("alive") and n.get("ready", True)}
    candidates = [
        g for g in status.get("gpus", [])
        if g.get("node") != source and g.get("node") in up and g.get("health", "healthy") == "healthy"
    ]
    if not candidates:
        return None
    best = max(candidates, key=lambda g: float(g.get("memory_total", 0)) - float(g.get("memory_used", 0)))
    return gpu_label(best)


# ----------------------------------------------------------------------------- rows of the tables

Cells = list[Text | str]


def _gpu_contents(g: dict[str, Any]) -> Text | str:
    """Its models, and what keeps work off it (a breaker, a poisoned device, a cordon) with the reason."""
    models = ", ".join(g.get("models", [])) or Text("(empty)", style="dim")
    health = str(g.get("health", "healthy"))
    if health == "healthy":
        return models
    # The reason opens with the state ("breaker open for 12s more: ...", "unhealthy: ...").
    return Text.assemble(models, "  ", Text(str(g.get("health_reason") or health),
                                            style=STATE_STYLES.get(health, "bold red")))


def resource_rows(status: dict[str, Any]) -> list[tuple[str, Cells]]:
    """One row per GPU (memory bar, models) and per storage tier (fill, bandwidth, contents)."""
    rows: list[tuple[str, Cells]] = []
    for g in status.get("gpus", []):
        used, total = float(g.get("memory_used", 0)), float(g.get("memory_total", 0))
        rows.append((f"gpu:{gpu_label(g)}", [
            gpu_label(g), f"gpu ({g.get('device', '?')})", bar(used, total),
            f"{fmt_bytes(used)} / {fmt_bytes(total)}" if total else fmt_bytes(used), "-",
            _gpu_contents(g),
        ]))
    for t in status.get("tiers", []):
        used, cap = float(t.get("used_bytes", 0)), float(t.get("capacity_bytes", 0))
        rows.append((f"tier:{t.get('node', '?')}/{t.get('tier', '?')}", [
            str(t.get("node", "?")), str(t.get("tier", "?")), bar(used, cap),
            f"{fmt_bytes(used)} / {fmt_bytes(cap)}" if cap else fmt_bytes(used),
            fmt_bandwidth(float(t.get("bandwidth", 0.0) or 0.0)),
            ", ".join(t.get("models", [])) or Text("(empty)", style="dim"),
        ]))
    return rows


def request_rows(status: dict[str, Any]) -> list[tuple[str, Cells]]:
    rows: list[tuple[str, Cells]] = []
    for r in status.get("requests", []):
        rows.append((str(r.get("request_id", "?")), [
            str(r.get("request_id", "?")), str(r.get("model", "")), state_text(str(r.get("state", ""))),
            str(r.get("tokens", 0)), f"{float(r.get('tokens_per_s', 0.0) or 0.0):.1f}",
            where(str(r.get("node", "")), str(r.get("instance_id", ""))), str(r.get("migrations", 0)),
        ]))
    for q in status.get("queue", []):
        rows.append((str(q.get("request_id", "?")), [
            str(q.get("request_id", "?")), str(q.get("model", "")), state_text("queued"), "0", "-",
            "(waiting for a GPU)", "0",
        ]))
    return rows


def migration_rows(status: dict[str, Any]) -> list[tuple[str, Cells]]:
    """Migrations in progress. Producers differ in what they report (one request or a list, rounds and
    tokens or not), so each cell falls back to '-'."""
    rows: list[tuple[str, Cells]] = []
    for i, m in enumerate(status.get("migrations", [])):
        requests = m.get("requests") or ([m["request_id"]] if m.get("request_id") else [])
        migration_id = str(m.get("migration_id", f"#{i}"))
        rows.append((f"{migration_id}:{','.join(map(str, requests))}", [
            migration_id, ", ".join(map(str, requests)) or "-", str(m.get("source", m.get("from", "-"))),
            str(m.get("dest", m.get("to", "-"))), state_text(str(m.get("state", "?"))),
            str(m.get("round", m.get("rounds", "-"))), str(m.get("tokens_recomputed", "-")),
            _seconds(m.get("pause_s")), _seconds(m.get("seconds")),
        ]))
    return rows


def _seconds(value: Any) -> str:
    return f"{float(value):.2f}s" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


# ----------------------------------------------------------------------------- the actor tree


@dataclass(frozen=True)
class Item:
    """What a line of the actor tree stands for; ``node`` is the cluster node it belongs to, if any."""

    kind: str  # controller, actor, node, gpu, instance, tier
    key: str
    node: str = ""


TreeLine = tuple[str, str | None, Text, Item]
"""(key, parent key or None for the root's children, label, item)."""


def _restarts(count: int) -> Text:
    return Text(f" ↻{count}", style="yellow" if count else "dim")


def tree_lines(status: dict[str, Any], memory: EventMemory) -> list[TreeLine]:
    """controller -> its actors and the nodes -> GPUs -> instances, and each node's tiers; parents first."""
    lines: list[TreeLine] = []
    nodes = status.get("nodes", [])
    up = sum(1 for n in nodes if n.get("alive"))
    label = Text("controller ", style="bold")
    label.append_text(state_text("running"))
    label.append(f"  {up}/{len(nodes)} nodes up", style="dim")
    lines.append(("controller", None, label, Item("controller", "controller")))
    for actor in CONTROLLER_ACTORS:
        label = Text(f"{actor} ")
        label.append_text(state_text("running"))
        label.append_text(_restarts(memory.restarts_of("controller", actor)))
        lines.append((f"actor:{actor}", "controller", label, Item("actor", actor)))
    instances = status.get("instances", [])
    for n in nodes:
        name = str(n.get("name", "?"))
        state = node_state(n, memory)
        label = Text(f"{name} ", style="bold")
        label.append_text(state_text(state))
        if n.get("pid"):
            label.append(f" pid {n['pid']}", style="dim")
        label.append_text(_restarts(int(n.get("restarts", 0) or 0)))
        if n.get("cordoned"):
            label.append(" ")
            label.append_text(state_text(str(n["cordoned"])))
        node_key = f"node:{name}"
        lines.append((node_key, "controller", label, Item("node", name, name)))
        for g in (g for g in status.get("gpus", []) if g.get("node") == name):
            gpu_name = f"gpu-{g.get('index', '?')}"
            used, total = float(g.get("memory_used", 0)), float(g.get("memory_total", 0))
            on_gpu = [i for i in instances if i.get("node") == name and i.get("gpu") == g.get("index")]
            label = Text(f"{gpu_name} ({g.get('device', '?')}) ")
            label.append_text(state_text("dead" if state in ("dead", "restarting") else gpu_state(on_gpu)))
            if g.get("health", "healthy") not in ("healthy", "cordoned", "draining"):
                label.append(" ")
                label.append_text(state_text(str(g["health"])))
            label.append(f" {fmt_bytes(used)}/{fmt_bytes(total)}", style="dim")
            label.append_text(_restarts(memory.restarts_of(name, gpu_name)))
            gpu_key = f"gpu:{name}/{gpu_name}"
            lines.append((gpu_key, node_key, label, Item("gpu", gpu_label(g), name)))
            for inst in on_gpu:
                instance_id = str(inst.get("instance_id", "?"))
                label = Text(f"{instance_id} ")
                label.append_text(state_text(instance_state(inst)))
                n_requests = len(inst.get("requests", []) or [])
                label.append(f" {n_requests} req", style="dim")
                if inst.get("waiting"):
                    label.append(f" +{inst['waiting']} waiting", style="yellow")
                if inst.get("kv_blocks_total"):
                    label.append(f" · KV {inst.get('kv_blocks_used', 0)}/{inst['kv_blocks_total']}", style="dim")
                if inst.get("tier"):
                    load_s = float(inst.get("load_s", 0.0))
                    label.append(f" · from {inst['tier']} in {load_s:.2f}s", style="dim")
                lines.append((f"instance:{instance_id}", gpu_key, label, Item("instance", instance_id, name)))
        for t in (t for t in status.get("tiers", []) if t.get("node") == name):
            tier = str(t.get("tier", "?"))
            used, cap = float(t.get("used_bytes", 0)), float(t.get("capacity_bytes", 0))
            label = Text(f"tier {tier} ")
            label.append(f"{used / cap * 100:.0f}% " if cap else "", style="dim")
            models = t.get("models", [])
            label.append(", ".join(models) or "(empty)", style="cyan" if models else "dim")
            restarts = sum(count for (on, child), count in memory.actor_restarts.items()
                           if on == name and tier in child)
            label.append_text(_restarts(restarts))
            lines.append((f"tier:{name}/{tier}", node_key, label, Item("tier", tier, name)))
    return lines
