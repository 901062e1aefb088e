"""NodeRegistryActor: which nodes are alive, on evidence only.

A node is alive from its ``NodeHello`` until it misses ``MISSED_BEATS`` heartbeats (any message
counts as a beat) or its process sentinel fires; a hello with a new incarnation means the old
process is gone. Each decision is logged with the node's name and published as an event.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pykka

from sllm_actors.actors.controller import scheduler
from sllm_actors.actors.controller.context import ClusterContext
from sllm_actors.messages import (
    Heartbeat,
    NodeConfig,
    NodeHello,
    NodeProcessExited,
    NodeStatus,
    Query,
    Tick,
)
from sllm_actors.runtime.supervisor import Directory, SupervisedActor

__all__ = [
    "NodeRegistryActor",
    "alive_nodes",
    "node_hello",
    "node_process_exited",
    "node_seen",
    "node_status",
    "tick",
]

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
MISSED_BEATS = 5
"""Dead after 5 s of silence: a node busy building a model on a starved CPU can be quiet for seconds
(3.3 s was seen on a 2-core machine while a node loaded a migration's destination and decoded), and a
false death costs its instances (their requests move, then it is told to unload). A crashed node is
found at once by its process sentinel; silence only catches a hung one."""


@dataclass
class NodeRecord:
    name: str
    incarnation: str = ""
    pid: int = 0
    alive: bool = False
    ready: bool = False
    """Alive and its actors built: it reported its first status. Only then does it get work."""
    last_seen: float = 0.0
    joined_at: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    local: bool = True
    exited: bool = False
    """Its process is known to have ended: a late message from it is no sign of life."""


@dataclass(frozen=True)
class Seen:
    """In-process: any message from a node (a beat)."""

    node: str


# ------------------------------------------------------------------ client functions
# What the controller's IO thread and the node process actors tell the registry; each returns False when the
# registry is not there (restarting), as ``Directory.tell`` does.

REGISTRY = "registry"
"""The registry's name in the controller's directory."""


def node_seen(directory: Directory, node: str) -> bool:
    """A message came from ``node``: a sign of life (rate-limited by the caller)."""
    return directory.tell(REGISTRY, Seen(node))


def node_hello(directory: Directory, hello: NodeHello) -> bool:
    """A node process joined (or rejoined as a new incarnation): the registry sends it its configuration."""
    return directory.tell(REGISTRY, hello)


def node_status(directory: Directory, status: NodeStatus) -> bool:
    """A node's periodic status; its first one marks the node ready for work."""
    return directory.tell(REGISTRY, status)


def node_process_exited(directory: Directory, node: str, returncode: int) -> bool:
    """The local process of ``node`` ended: evidence of death that outruns missed heartbeats."""
    return directory.tell(REGISTRY, NodeProcessExited(node, returncode))


def tick(directory: Directory, now: float) -> bool:
    """The periodic wake-up: check heartbeats and beat to the nodes."""
    return directory.tell(REGISTRY, Tick(now))


def alive_nodes(directory: Directory, timeout: float = 2.0) -> list[str]:
    """The nodes alive and ready for work; none while the registry restarts or does not answer in time."""
    ref = directory.get(REGISTRY)
    if ref is None:
        return []
    try:
        alive: list[str] = ref.ask(Query("alive"), block=False).get(timeout=timeout)
    except (pykka.ActorDeadError, pykka.Timeout):
        return []
    return alive


class NodeRegistryActor(SupervisedActor):
    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, cluster: ClusterContext) -> None:
        super().__init__(supervisor, name)
        self.cluster = cluster
        self.nodes: dict[str, NodeRecord] = {
            n.name: NodeRecord(n.name, local=n.host == "local") for n in cluster.topology.nodes
        }
        self.seq = 0

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Seen):
            rec = self.nodes.get(message.node)
            if rec is not None and rec.alive:
                rec.last_seen = time.monotonic()
            elif rec is not None and rec.incarnation and rec.pid and not rec.exited:
                self._revive(rec)
        elif isinstance(message, NodeHello):
            self._hello(message)
        elif isinstance(message, Heartbeat):
            pass  # Seen already counted it
        elif isinstance(message, NodeStatus):
            rec = self.nodes.get(message.node)
            if rec is not None and rec.alive and message.status.get("incarnation") == rec.incarnation:
                rec.status = message.status
                if not rec.ready:
                    rec.ready = True
                    self.cluster.events.emit("node", f"{rec.name} ready", {"node": rec.name})
                    scheduler.node_up(self.cluster.directory, rec.name, rec.incarnation)
        elif isinstance(message, Tick):
            self._check(message.now)
        elif isinstance(message, NodeProcessExited):
            rec = self.nodes.get(message.node)
            if rec is not None:
                rec.restarts += 1
                rec.exited = True
                if rec.alive:
                    self._lost(rec, f"process exited with code {message.returncode}")
        elif isinstance(message, Query):
            return self._query(message.what)
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    def _hello(self, hello: NodeHello) -> None:
        rec = self.nodes.get(hello.node)
        if rec is None:
            return  # the controller already refused it; unknown names never reach here
        if rec.alive and rec.incarnation == hello.incarnation:
            # A repeated hello from the same process: its config was lost on the way (a re-registration waits
            # for it), so it goes again.
            spec = self.cluster.topology.node(hello.node)
            self.cluster.to_node(hello.node, NodeConfig(hello.node, spec.to_dict(), self.cluster.epoch))
            return
        if rec.alive:
            self._lost(rec, "a new process of the same name joined")
        rec.alive = True
        rec.ready = False
        rec.exited = False
        rec.incarnation = hello.incarnation
        rec.pid = hello.pid
        rec.last_seen = time.monotonic()
        rec.joined_at = time.time()
        rec.status = {}
        spec = self.cluster.topology.node(hello.node)
        self.cluster.to_node(hello.node, NodeConfig(hello.node, spec.to_dict(), self.cluster.epoch))
        log.info("registry: node %s joined (pid %d)", hello.node, hello.pid)
        self.cluster.events.emit("node", f"{hello.node} joined (pid {hello.pid})", {"node": hello.node})

    def _revive(self, rec: NodeRecord) -> None:
        """A node declared dead on silence spoke again: it was slow, not dead. Its instances were
        given up on; the scheduler tells it to unload them when its next status lists them."""
        rec.alive = rec.ready = True
        rec.last_seen = time.monotonic()
        log.warning("registry: node %s is back after being declared dead (it was only silent)", rec.name)
        self.cluster.events.emit("node", f"{rec.name} back (it was only silent)", {"node": rec.name})
        scheduler.node_up(self.cluster.directory, rec.name, rec.incarnation)

    def _check(self, now: float) -> None:
        self.seq += 1
        for rec in self.nodes.values():
            if rec.alive and now - rec.last_seen > HEARTBEAT_S * MISSED_BEATS:
                self._lost(rec, f"missed {MISSED_BEATS} heartbeats ({now - rec.last_seen:.1f}s silent)")
            if rec.incarnation and not rec.exited:
                # Beats go to a node declared dead too: if it was only slow, it stays and can come back.
                self.cluster.to_node(rec.name, Heartbeat("controller", self.seq))

    def _lost(self, rec: NodeRecord, reason: str) -> None:
        rec.alive = False
        rec.ready = False
        rec.status = {}
        log.warning("registry: node %s is dead: %s", rec.name, reason)
        self.cluster.events.emit("crash", f"{rec.name} lost: {reason}", {"node": rec.name})
        scheduler.node_lost(self.cluster.directory, rec.name, reason)

    def _query(self, what: str) -> Any:
        if what == "alive":
            return sorted(n for n, r in self.nodes.items() if r.alive and r.ready)
        if what == "nodes":
            return [
                {
                    "name": r.name,
                    "pid": r.pid,
                    "alive": r.alive,
                    "ready": r.ready,
                    "local": r.local,
                    "restarts": r.restarts,
                    "incarnation": r.incarnation,
                    "status": r.status,
                }
                for r in self.nodes.values()
            ]
        raise ValueError(f"unknown query {what!r}")
