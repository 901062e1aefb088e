"""SsdTierActor: checkpoints in our format in a local directory, with a capacity and LRU eviction.

Checkpoints arrive from the repository tier (converted on the way in) and are written under a
temporary name and renamed when whole, so a crash never leaves one that looks complete.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

from sllm_actors.actors.tier_common import Bandwidth, measure_disk_read
from sllm_actors.messages import Query, TierDrop, TierLoaded, TierLookup, TierRelease, TierStore
from sllm_actors.node_context import NodeContext
from sllm_actors.supervisor import SupervisedActor

log = logging.getLogger(__name__)


@dataclass
class Entry:
    path: Path
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)
    leases: int = 0
    """Loads reading this copy now (a build, the DRAM tier's copy): it is not evicted under them."""


class SsdTierActor(SupervisedActor):
    tier = "ssd"

    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, node: NodeContext, root: str,
                 capacity: int, limit: float | None = None) -> None:
        super().__init__(supervisor, name)
        self.node = node
        self.root = Path(root)
        self.capacity = capacity
        self.limit = limit
        self.entries: dict[str, Entry] = {}
        self.bandwidth = Bandwidth()

    def started(self) -> None:
        from sllm_actors.storage import checkpoint_size, is_checkpoint

        self.root.mkdir(parents=True, exist_ok=True)
        for child in sorted(self.root.iterdir()):
            if child.name.startswith("."):
                shutil.rmtree(child, ignore_errors=True)  # a store cut short by a crash
            elif is_checkpoint(child):
                self.entries[child.name] = Entry(child, checkpoint_size(child))
        measured = measure_disk_read(self.root)
        self.bandwidth = Bandwidth(min(measured, self.limit) if self.limit else measured)
        self._publish()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, TierLookup):
            entry = self.entries.get(message.model)
            if entry is None:
                return None
            entry.last_used = time.monotonic()
            entry.leases += 1
            return str(entry.path)
        if isinstance(message, TierStore):
            return self._store(message.model, Path(message.path))
        if isinstance(message, TierRelease):
            entry = self.entries.get(message.model)
            if entry is not None:
                entry.leases = max(0, entry.leases - 1)
            return None
        if isinstance(message, TierDrop):
            entry = self.entries.pop(message.model, None)
            if entry is not None:
                log.warning("%s: dropping %s: %s", self.name, message.model, message.reason)
                shutil.rmtree(entry.path, ignore_errors=True)
                self._publish()
            return None
        if isinstance(message, TierLoaded):
            self.bandwidth.observe(message.nbytes, message.seconds)
            self._publish()
            return None
        if isinstance(message, Query):
            return {m: str(e.path) for m, e in self.entries.items()}
        raise TypeError(f"{self.name}: unexpected message {message!r}")

    def _store(self, model: str, source: Path) -> str:
        from sllm_actors.storage import checkpoint_size, convert, copy_checkpoint, is_checkpoint

        existing = self.entries.get(model)
        if existing is not None:
            existing.leases += 1
            return str(existing.path)
        dest = self.root / model
        tmp = self.root / f".{model}.incoming"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if is_checkpoint(source):
                # Already our format: copied with every chunk checked, so a fetch that is corrupt or cut
                # short midway raises here and leaves nothing behind (a load may be reading it meanwhile).
                copy_checkpoint(source, tmp)
            else:
                convert(str(source), str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        nbytes = checkpoint_size(tmp)
        self._evict_for(nbytes, keep=model)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        self.entries[model] = Entry(dest, nbytes, leases=1)
        self._publish()
        return str(dest)

    def _evict_for(self, nbytes: int, keep: str) -> None:
        while self.entries and sum(e.nbytes for e in self.entries.values()) + nbytes > self.capacity:
            victim = min((m for m, e in self.entries.items() if m != keep and e.leases == 0),
                         key=lambda m: self.entries[m].last_used, default=None)
            if victim is None:
                return  # every other copy is being read: over capacity until a lease ends
            log.info("%s: evicting %s (LRU) to make room", self.name, victim)
            self.node.event("evict", f"{self.node.name} ssd evicted {victim}", {"tier": "ssd", "model": victim})
            shutil.rmtree(self.entries.pop(victim).path, ignore_errors=True)

    def _publish(self) -> None:
        self.node.board.update_tier(
            self.tier, models=sorted(self.entries), used_bytes=sum(e.nbytes for e in self.entries.values()),
            capacity_bytes=self.capacity, bandwidth=self.bandwidth.value, path=str(self.root),
        )
