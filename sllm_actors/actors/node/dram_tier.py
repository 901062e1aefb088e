"""DramTierActor: whole checkpoints in host memory (page-locked on CUDA hosts), LRU, never evicting
one that a load is copying from. A hit copies straight to the device at memory or PCIe speed.

Each held checkpoint keeps its own copy of the small files a build reads besides the weights (index,
config, generation config, tokenizer) in ``meta_root``, so a DRAM hit never depends on the SSD copy it
came from: the SSD tier may have evicted that one since.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

from sllm_actors.actors.node.tier_common import Bandwidth, measure_host_copy, release_lease
from sllm_actors.messages import TierLoaded, TierLookup, TierRelease, TierStore
from sllm_actors.actors.node.context import NodeContext
from sllm_actors.runtime.supervisor import Directory, SupervisedActor

__all__ = ["DramTierActor", "store_copy"]

log = logging.getLogger(__name__)

DRAM = "dram"
"""The DRAM tier's name in the node's directory."""


def store_copy(directory: Directory, model: str, path: str, release: str) -> bool:
    """Copy the checkpoint at ``path`` into pinned host memory as ``model``, then hand the ``release``
    tier's lease on ``path`` back (also when the copy fails). False when the DRAM tier is restarting: no
    copy, and the lease is the caller's to release."""
    return directory.tell(DRAM, TierStore(model, path, release))


@dataclass
class Held:
    host: Any  # storage.HostCheckpoint
    path: str
    """This tier's copy of the checkpoint's files but its weights (config, tokenizer, index)."""
    nbytes: int
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)


class DramTierActor(SupervisedActor):
    tier = "dram"

    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, node: NodeContext, capacity: int,
                 device: str, meta_root: str | Path) -> None:
        super().__init__(supervisor, name)
        self.node = node
        self.capacity = capacity
        self.device = device
        self.meta_root = Path(meta_root)
        self.held: OrderedDict[str, Held] = OrderedDict()
        self.bandwidth = Bandwidth()

    def started(self) -> None:
        # Whatever is there belongs to copies held by an earlier process (or incarnation), gone now.
        shutil.rmtree(self.meta_root, ignore_errors=True)
        self.meta_root.mkdir(parents=True, exist_ok=True)
        self.bandwidth = Bandwidth(measure_host_copy(self.device))
        self._publish()

    def stopping(self) -> None:
        self.held.clear()  # the node is going; its memory goes with it
        shutil.rmtree(self.meta_root, ignore_errors=True)

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
            try:
                self._store(message.model, message.path)
            finally:
                if message.release:
                    release_lease(self.node.directory, message.release, message.model)
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
            meta = self._copy_small_files(model, Path(path), {p.file for p in host.index.partitions})
        except (CheckpointError, OSError) as exc:
            log.warning("%s: not caching %s: %s", self.name, model, exc)
            return
        self.held[model] = Held(host, str(meta), nbytes)
        self._publish()

    def _copy_small_files(self, model: str, source: Path, weight_files: set[str]) -> Path:
        dest = self.meta_root / model
        tmp = self.meta_root / f".{model}.incoming"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=lambda _dir, names: [n for n in names if n in weight_files])
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return dest

    def _make_room(self, nbytes: int) -> bool:
        while sum(h.nbytes for h in self.held.values()) + nbytes > self.capacity:
            victim = next((m for m, h in self.held.items() if h.leases == 0), None)  # oldest first
            if victim is None:
                return False
            log.info("%s: evicting %s (LRU)", self.name, victim)
            self.node.event("evict", f"{self.node.name} dram evicted {victim}", {"tier": "dram", "model": victim})
            del self.held[victim]
            shutil.rmtree(self.meta_root / victim, ignore_errors=True)
        return True

    def _publish(self) -> None:
        self.node.board.update_tier(
            self.tier, models=list(self.held), used_bytes=sum(h.nbytes for h in self.held.values()),
            capacity_bytes=self.capacity, bandwidth=self.bandwidth.value,
        )
