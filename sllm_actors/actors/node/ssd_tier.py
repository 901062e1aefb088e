"""SsdTierActor: checkpoints in our format in a local directory, with a capacity and LRU eviction.

Checkpoints arrive from the repository tier (converted on the way in) and are written under a
temporary name and renamed when whole, so a crash never leaves one that looks complete. A copy runs on a thread
of its own, so the tier answers lookups meanwhile: a 16 GB copy takes 10 s, and it may run behind a model that is
already serving (a repository cold start), while other models' cold starts on the node ask this tier.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

from sllm_actors.actors.node.tier_common import Bandwidth, measure_disk_read
from sllm_actors.messages import Query, TierDrop, TierLoaded, TierLookup, TierRelease, TierStore
from sllm_actors.actors.node.context import NodeContext
from sllm_actors.runtime.supervisor import SupervisedActor

__all__ = ["SsdTierActor", "store"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Stored:
    """In-process: a copy's thread is done (``error`` None) or failed."""

    model: str
    tmp: Path
    error: BaseException | None


def store(ref: pykka.ActorRef[Any], model: str, path: str, timeout: float = 60.0) -> pykka.Future[str]:
    """Ask the SSD tier to hold the checkpoint at ``path`` as ``model``: a future of the copy's path, leased to the
    caller (``TierRelease`` ends the lease), set once the copy is whole and checked, or failing with the copy's
    error (nothing left behind)."""
    return ref.ask(TierStore(model, path), timeout=timeout)


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
        self.storing: dict[str, list[pykka.ThreadingFuture[str]]] = {}
        """model -> the futures waiting for its copy in progress (a second store of it waits for the first)."""

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
        if isinstance(message, _Stored):
            self._stored(message)
            return None
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

    def _store(self, model: str, source: Path) -> pykka.ThreadingFuture[str]:
        future: pykka.ThreadingFuture[str] = pykka.ThreadingFuture()
        existing = self.entries.get(model)
        if existing is not None:
            existing.leases += 1
            future.set(str(existing.path))
            return future
        waiting = self.storing.get(model)
        if waiting is not None:
            waiting.append(future)
            return future
        self.storing[model] = [future]
        # Unique: a copy left running by this tier's previous incarnation (a crash) must not share it.
        tmp = self.root / f".{model}.{uuid.uuid4().hex[:8]}.incoming"
        threading.Thread(target=self._copy, args=(model, source, tmp), daemon=True,
                         name=f"sllm-ssd-store-{model}").start()
        return future

    def _copy(self, model: str, source: Path, tmp: Path) -> None:
        """On the copy's own thread: the checkpoint into ``tmp``, every chunk checked; then back to the actor."""
        from sllm_actors.storage import convert, copy_checkpoint, is_checkpoint

        error: BaseException | None = None
        try:
            if is_checkpoint(source):
                # Already our format: copied with every chunk checked, so a fetch that is corrupt or cut short
                # midway raises here and leaves nothing behind (a load may be reading it meanwhile).
                copy_checkpoint(source, tmp)
            else:
                convert(str(source), str(tmp))
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter, as data
            shutil.rmtree(tmp, ignore_errors=True)
            error = exc
        try:
            self.actor_ref.tell(_Stored(model, tmp, error))
        except pykka.ActorDeadError:  # the tier stopped or crashed meanwhile: its waiters were failed then
            shutil.rmtree(tmp, ignore_errors=True)

    def _stored(self, msg: _Stored) -> None:
        from sllm_actors.storage import checkpoint_size

        waiting = self.storing.pop(msg.model, [])
        if msg.error is not None:
            for future in waiting:
                future.set_exception((type(msg.error), msg.error, msg.error.__traceback__))
            return
        dest = self.root / msg.model
        try:
            nbytes = checkpoint_size(msg.tmp)
            self._evict_for(nbytes, keep=msg.model)
            shutil.rmtree(dest, ignore_errors=True)
            msg.tmp.rename(dest)
        except OSError as exc:  # the disk refused the last step: the waiters hear it, nothing is left behind
            shutil.rmtree(msg.tmp, ignore_errors=True)
            for future in waiting:
                future.set_exception((type(exc), exc, exc.__traceback__))
            return
        self.entries[msg.model] = Entry(dest, nbytes, leases=len(waiting))
        self._publish()
        for future in waiting:
            future.set(str(dest))

    def stopping(self) -> None:
        for model, waiting in self.storing.items():
            error = RuntimeError(f"{self.name} stopped while storing {model}")
            for future in waiting:
                future.set_exception((RuntimeError, error, None))
        self.storing.clear()

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
