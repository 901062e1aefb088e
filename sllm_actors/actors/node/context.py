"""What the actors of one node process share: its name, its link to the controller, its board.

The board is where each actor publishes its own state (an instance's requests, a tier's contents);
the node's IO thread sends it to the controller when it changed. Actors write only their own entry.
"""

from __future__ import annotations

import copy
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from sllm_actors.runtime import wire
from sllm_actors.messages import ClusterEvent, Message
from sllm_actors.runtime.supervisor import Directory
from sllm_actors.runtime.transport import connect_each

__all__ = ["LINK_SEPARATOR", "Link", "Loaded", "NodeContext"]


LINK_SEPARATOR = "~"
"""An actor's socket identity is ``node~actor``; the controller reads the node from it."""


class NodeBoard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gpus: dict[int, dict[str, Any]] = {}
        self._instances: dict[str, dict[str, Any]] = {}
        self._tiers: dict[str, dict[str, Any]] = {}
        self.version = 0

    def update_gpu(self, index: int, **fields: Any) -> None:
        with self._lock:
            self._gpus.setdefault(index, {"index": index}).update(fields)
            self.version += 1

    def update_instance(self, instance_id: str, **fields: Any) -> None:
        with self._lock:
            self._instances.setdefault(instance_id, {"instance_id": instance_id}).update(fields)
            self.version += 1

    def remove_instance(self, instance_id: str) -> None:
        with self._lock:
            if self._instances.pop(instance_id, None) is not None:
                self.version += 1

    def update_tier(self, tier: str, **fields: Any) -> None:
        with self._lock:
            self._tiers.setdefault(tier, {"tier": tier}).update(fields)
            self.version += 1

    def instances_on(self, gpu: int) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(i) for i in self._instances.values() if i.get("gpu") == gpu]

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            return self.version, {
                "gpus": [copy.deepcopy(self._gpus[i]) for i in sorted(self._gpus)],
                "instances": [copy.deepcopy(v) for v in self._instances.values()],
                "tiers": [copy.deepcopy(self._tiers[t]) for t in sorted(self._tiers)],
            }


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    tier: str
    memory_bytes: int
    parts: dict[str, float] = field(default_factory=dict)
    """Where the load's time went, in seconds (``storage_client.LOAD_PARTS``)."""
    after_ready: Callable[[], None] | None = None
    """What the storage does once the instance serves, or has failed (the DRAM tier's copy of what was read: its
    page-locking, in the CUDA driver's lock, would otherwise stall the engine's set-up). Called once by the
    instance."""
    mode: str = "serverlessllm"
    """The node's load mode (``topology.LOAD_MODES``) this load went by: a baseline's loads say so in their event."""
    on_unload: Callable[[], None] | None = None
    """What the storage does when the instance stops (a baseline's per-instance checkpoint copy is deleted then,
    as a Ray Serve replica's or a KServe pod's disk goes with it). Called once by the instance."""


class Link:
    """A DEALER socket of one actor's own, to the controller, used from one thread at a time: the actor's, or the
    thread it hands its sends to (an instance's output processor, gpu/output.py, the only one once it runs).

    Token traffic goes through it instead of the node's IO thread: a hand-off to another Python
    thread per token costs a GIL round trip (measured at ~0.5 ms a token on 2 cores), while
    ZeroMQ's own IO threads run without the GIL. One socket per instance also keeps every message
    about a request in order.
    """

    def __init__(self, context: zmq.Context, endpoint: str, identity: str, credentials: Any = None,
                 held: threading.Event | None = None) -> None:
        self._held = held or threading.Event()
        self._lock = threading.Lock()
        """Taken around each use of the socket: ``release`` flushes from the node's thread (a lock hands a ZeroMQ
        socket between threads safely; never two at once)."""
        self._buffer: list[list[Any]] = []
        self._closed = False
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.setsockopt(zmq.IDENTITY, identity.encode())
        if credentials is not None:
            credentials.apply_client(self.socket)  # the node's own key: the controller checks the name
        connect_each(self.socket, endpoint)  # every controller's, with a standby: frames reach the leader only

    def send(self, msg: Message, address: str = "") -> None:
        frames = wire.pack(msg, address)
        with self._lock:
            if self._held.is_set():
                # The node is re-registering with a restarted controller: what leaves now must come after the
                # node's report of its requests, which the controller takes first (NodeContext.hold_links).
                self._buffer.append(frames)
                return
            self._flush()
            self.socket.send_multipart(frames, copy=False)

    def release(self) -> None:
        """Send what was held, in order (the node is registered again)."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._closed:
            return
        for frames in self._buffer:
            self.socket.send_multipart(frames, copy=False)
        self._buffer.clear()

    def close(self) -> None:
        with self._lock:
            if not self._held.is_set():
                self._flush()
            # Linger so tokens already queued still reach the controller.
            self.socket.close(linger=2000)
            self._closed = True


class NodeContext:
    def __init__(
        self,
        name: str,
        send: Callable[[Message, str], None],
        directory: Directory,
        zmq_context: zmq.Context | None = None,
        controller_endpoint: str = "",
    ) -> None:
        self.name = name
        self.zmq_context = zmq_context
        self.controller_endpoint = controller_endpoint
        self._send = send
        self.directory = directory
        self.board = NodeBoard()
        self.storage: Any = None  # set by the node once its tier actors exist
        self.credentials: Any = None  # the node's CURVE key (security.Credentials), for its actors' links
        self._links_held = threading.Event()
        self._links: weakref.WeakSet[Link] = weakref.WeakSet()

    def send(self, msg: Message, address: str = "") -> None:
        """To the controller, or through it to the node named ``address``."""
        self._send(msg, address)

    def open_link(self, actor: str) -> Link | None:
        """A socket of the calling actor's own (None without a controller endpoint, as in unit tests)."""
        if self.zmq_context is None or not self.controller_endpoint:
            return None
        link = Link(self.zmq_context, self.controller_endpoint, f"{self.name}{LINK_SEPARATOR}{actor}",
                    self.credentials, self._links_held)
        self._links.add(link)
        return link

    def hold_links(self) -> None:
        """Keep what the actors' links send until ``release_links``: the node reports its requests' logs to a
        restarted controller first, so no token reaches it before the log it extends."""
        self._links_held.set()

    def release_links(self) -> None:
        """Send what the links held, in order, and stop holding."""
        self._links_held.clear()
        for link in list(self._links):
            link.release()

    def event(self, kind: str, text: str, data: dict[str, Any] | None = None) -> None:
        self._send(ClusterEvent(time.time(), kind, text, {"node": self.name, **(data or {})}), "")
