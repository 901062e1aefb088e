"""DramTierActor: whole checkpoints in host memory (page-locked on CUDA hosts), LRU, never evicting
one that a load is copying from. A hit copies straight to the device at memory or PCIe speed."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import pykka

from sllm_actors.actors.tier_common import Bandwidth, measure_host_copy
from sllm_actors.messages import TierLoaded, TierLookup, TierRelease, TierStore
from sllm_actors.node_context import NodeContext
from sllm_actors.supervisor import SupervisedActor

log = logging.getLogger(__name__)


@dataclass
class Held:
    host: Any  # storage.HostCheckpoint
    path: str
    """The checkpoint it came from (config and tokenizer files are read from there)."""
    nbytes: int
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)


class DramTierActor(SupervisedActor):
    tier = "dram"

    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, node: NodeContext, capacity: int,
                 device: str) -> None:
        super().__init__(supervisor, name)
        self.node = node
        self.capacity = capacity
        self.device = device
        self.held: OrderedDict[str, Held] = OrderedDict()
        self.bandwidth = Bandwidth()

    def started(self) -> None:
        self.bandwidth = Bandwidth(measure_host_copy(self.device))
        self._publish()

    def stopping(self) -> None:
        self.held.clear()  # the node is going; its memory goes with it

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, TierLookup):
            held = self.held.get(message.model)
            if held is None:
                return None
            held.leases += 1
            held.last_used = time.monotonic()
            self.held.move_to_end(message.model)
            return held.host, held.path
        if isinstance(message, TierRelease):
            held = self.held.get(message.model)
            if held is not None:
                held.leases = max(0, held.leases - 1)
            return None
        if isinstance(message, TierStore):
            self._store(message.model, message.path)
            return None
        if isinstance(message, TierLoaded):
            self.bandwidth.observe(message.nbytes, message.seconds)
            self._publish()
            return None
        raise TypeError(f"{self.name}: unexpected message {message!r}")

    def _store(self, model: str, path: str) -> None:
        from sllm_actors.storage import CheckpointError, checkpoint_size, load_into_host

        if model in self.held or self.capacity <= 0:
            return
        nbytes = checkpoint_size(path)
        if nbytes > self.capacity or not self._make_room(nbytes):
            log.info("%s: %s (%d bytes) does not fit; not cached", self.name, model, nbytes)
            return
        try:
            host = load_into_host(path)
        except (CheckpointError, OSError) as exc:
            log.warning("%s: not caching %s: %s", self.name, model, exc)
            return
        self.held[model] = Held(host, path, nbytes)
        self._publish()

    def _make_room(self, nbytes: int) -> bool:
        while sum(h.nbytes for h in self.held.values()) + nbytes > self.capacity:
            victim = next((m for m, h in self.held.items() if h.leases == 0), None)  # oldest first
            if victim is None:
                return False
            log.info("%s: evicting %s (LRU)", self.name, victim)
            self.node.event("evict", f"{self.node.name} dram evicted {victim}", {"tier": "dram", "model": victim})
            del self.held[victim]
        return True

    def _publish(self) -> None:
        self.node.board.update_tier(
            self.tier, models=list(self.held), used_bytes=sum(h.nbytes for h in self.held.values()),
            capacity_bytes=self.capacity, bandwidth=self.bandwidth.value,
        )
