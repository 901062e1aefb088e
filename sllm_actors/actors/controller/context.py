"""What the controller's actors share: the topology, the sockets' send side, the event log, and the
request table (the token logs), which outlives a crashed router so a restarted one resumes them."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllm_actors.messages import ClusterEvent, Message, SamplingParams
from sllm_actors.runtime.supervisor import Directory
from sllm_actors.runtime.topology import Topology
from sllm_actors.runtime.transport import Transport

__all__ = ["CLIENTS", "CLUSTER", "STATE", "ClusterContext", "EventLog", "RequestRecord", "RequestTable"]

CLIENTS = "clients"
CLUSTER = "cluster"
STATE = "state"


class EventLog:
    def __init__(self, transport: Transport, keep: int = 300) -> None:
        self.transport = transport
        self._events: deque[ClusterEvent] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, event: ClusterEvent) -> None:
        with self._lock:
            self._events.append(event)
        self.transport.send(STATE, event)

    def emit(self, kind: str, text: str, data: dict[str, Any] | None = None) -> None:
        self.add(ClusterEvent(time.time(), kind, text, data or {}))

    def recent(self, n: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._events)[-n:]
        return [{"time": e.time, "kind": e.kind, "text": e.text, **({"data": e.data} if e.data else {})} for e in items]


@dataclass
class RequestRecord:
    """A request's resumable state: everything needed to continue it on any instance."""

    request_id: str
    client: bytes
    model: str
    prompt: str
    chat: bool
    sampling: SamplingParams
    """With its seed drawn: a resume anywhere samples what the first instance would have."""
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    node: str = ""
    instance_id: str = ""
    state: str = "placing"
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    migrations: list[dict[str, Any]] = field(default_factory=list)
    cold_start: dict[str, Any] = field(default_factory=dict)
    """The load this request waited for, if any (what ``GenerateDone.cold_start`` reports)."""
    active_migration: dict[str, Any] | None = None
    from_scratch: bool = False
    cache_salt: str = ""
    """Its prefix-cache salt, sent on with it to every instance (``GenerateRequest.cache_salt``)."""
    owner: str = ""
    """The owning client socket's identity (hex): only it may resume the stream after a controller restart."""
    finish_reason: str = ""
    """Set when it finished before its client reconnected (an adopted request): the client gets the end then."""
    adopted_at: float | None = None
    """When a node's re-registration handed it to this controller without a client (it waits for one)."""
    awaiting_since: float | None = None
    """When a reconnecting client asked for it before any node reported it (its node may still re-register)."""


class RequestTable:
    """Owned by the controller, used only from the router's thread (one at a time)."""

    def __init__(self) -> None:
        self.requests: dict[str, RequestRecord] = {}


@dataclass
class ClusterContext:
    topology: Topology
    transport: Transport
    directory: Directory
    events: EventLog
    table: RequestTable
    client_endpoint: str = ""
    cluster_endpoint: str = ""
    state_endpoint: str = ""
    http_endpoint: str = ""
    node_key_dir: Path | None = None
    """Where the local nodes' key files are (None: the cluster runs without CURVE)."""
    epoch: int = 1
    """This controller's generation (one more per start under ``sllm up``): sent in every ``NodeConfig``."""
    state_dir: Path | None = None
    """The cluster's state under ``$SLLM_HOME`` (local nodes' pids, the store); None: nothing persists."""
    store: Any = None
    """The cluster's persistent store (``store.ClusterStore``), or None."""
    controller_name: str = "controller"
    """This controller's name in the topology (several with etcd: ``sllm status`` shows which leads)."""
    controllers: list[dict[str, Any]] = field(default_factory=list)
    """Every controller of the cluster (name, client endpoint), with etcd; empty with one controller."""
    join_endpoint: str = ""
    """What local nodes join: every controller's cluster endpoint with etcd, else this one's (``cluster_endpoint``)."""

    def to_client(self, peer: bytes, msg: Message) -> None:
        self.transport.send(CLIENTS, msg, peer=peer)

    def to_clients(self, messages: list[tuple[bytes, Message]]) -> None:
        """Several messages to clients with one wake-up of the IO thread (a batch step's tokens)."""
        self.transport.send_many(CLIENTS, messages)

    def to_node(self, node: str, msg: Message) -> None:
        self.transport.send(CLUSTER, msg, peer=node.encode())

    def publish(self, msg: Message) -> None:
        self.transport.send(STATE, msg)
