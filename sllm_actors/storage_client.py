"""How a model instance obtains its weights: through the node's storage tier actors.

Fastest first: the DRAM tier (a host copy), then the SSD tier (our checkpoint format on local
disk), then the repository (download or convert, then stored on SSD). A load from SSD or the
repository leaves a copy in DRAM, so the next cold start of that model on this node is a DRAM hit.
A copy that fails its checksums is dropped and fetched again from the tier above; with no good
copy anywhere the load fails with the error naming file and tensor.

Typed client functions over the tier actors, so instances never build raw tier messages.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from sllm_actors.actors.dram_tier import DramTierActor
from sllm_actors.actors.repository_tier import RepositoryTierActor
from sllm_actors.actors.ssd_tier import SsdTierActor
from sllm_actors.messages import Fetch, TierDrop, TierLoaded, TierLookup, TierRelease, TierStore
from sllm_actors.node_context import Loaded, NodeContext
from sllm_actors.supervisor import ChildSpec
from sllm_actors.topology import NodeSpec

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 900.0
"""A first fetch of the default model downloads and converts it; later ones are instant."""
ASK_TIMEOUT_S = 60.0


def dram_meta_root(spec: NodeSpec) -> Path:
    """Where a node's DRAM tier keeps the small files of the checkpoints it holds: beside the SSD tier's
    directory (unique per node, and outside it, since the SSD tier owns everything inside)."""
    ssd = Path(spec.ssd_path)
    return ssd.with_name(f"{ssd.name}.dram")


class StorageClient:
    def __init__(self, node: NodeContext, spec: NodeSpec) -> None:
        self.node = node
        self.spec = spec
        # Building a transformers model touches process-wide state (default dtype and device, lazy
        # init flags): two instances building at once corrupt each other. Loads on a node take turns.
        self.build_lock = threading.Lock()

    def child_specs(self) -> list[ChildSpec]:
        spec, node = self.spec, self.node
        return [
            ChildSpec("repository", lambda sup, name: RepositoryTierActor.start(
                sup, name, node=node, limit=spec.repository_bandwidth)),
            ChildSpec("ssd", lambda sup, name: SsdTierActor.start(
                sup, name, node=node, root=spec.ssd_path, capacity=spec.ssd_bytes, limit=spec.ssd_bandwidth)),
            ChildSpec("dram", lambda sup, name: DramTierActor.start(
                sup, name, node=node, capacity=spec.dram_bytes, device=spec.gpus[0].device,
                meta_root=dram_meta_root(spec))),
        ]

    def _ask(self, tier: str, message: Any, timeout: float = ASK_TIMEOUT_S) -> Any:
        ref = self.node.directory.get(tier)
        if ref is None:
            raise RuntimeError(f"{self.node.name}: the {tier} tier is restarting; try again")
        return ref.ask(message, timeout=timeout)

    def _tell(self, tier: str, message: Any) -> None:
        self.node.directory.tell(tier, message)

    def load(self, model: str, source: str, device: str, dtype: str = "") -> Loaded:
        """``dtype``: the serving dtype (a torch dtype name); empty keeps the stored one."""
        from sllm_actors.storage import CheckpointError

        hit = self._ask("dram", TierLookup(model))
        if hit is not None:
            host, host_path = hit
            try:
                return self._build(model, device, "dram", path=host_path, host=host, dtype=dtype)
            finally:
                self._tell("dram", TierRelease(model))
        # The SSD copy (looked up or fetched) is leased until the DRAM tier has copied it, so a store of
        # another model cannot evict it mid-read.
        path = self._ask("ssd", TierLookup(model))
        tier = "ssd"
        if path is None:
            path, tier = self._fetch(model, source), "repository"
        try:
            try:
                loaded = self._build(model, device, tier, path=path, dtype=dtype)
            except CheckpointError as exc:
                # The SSD copy is bad: drop it and take a fresh one from the repository, once.
                log.warning("%s: %s on SSD failed verification: %s; fetching again", self.node.name, model, exc)
                self.node.event("corrupt", f"{model} on {self.node.name} ssd failed its checksums: {exc}",
                                {"model": model})
                self._tell("ssd", TierDrop(model, str(exc)))
                path, tier = self._fetch(model, source), "repository"
                loaded = self._build(model, device, tier, path=path, dtype=dtype)
        except BaseException:
            self._tell("ssd", TierRelease(model))
            raise
        if not self.node.directory.tell("dram", TierStore(model, path, release="ssd")):
            self._tell("ssd", TierRelease(model))  # the DRAM tier is restarting: no copy this time
        return loaded

    def _fetch(self, model: str, source: str) -> str:
        from sllm_actors.storage import checkpoint_size

        started = time.perf_counter()
        local = self._ask("repository", Fetch(model, source), timeout=FETCH_TIMEOUT_S)
        path = str(self._ask("ssd", TierStore(model, str(local)), timeout=FETCH_TIMEOUT_S))
        self._tell("repository", TierLoaded(model, checkpoint_size(path), time.perf_counter() - started))
        return path

    def _build(self, model: str, device: str, tier: str, *, path: str, host: Any = None, dtype: str = "") -> Loaded:
        import torch

        from sllm_actors.storage import checkpoint_size, load_model, load_tokenizer

        started = time.perf_counter()
        with self.build_lock:
            hf_model = load_model(path, device, host=host, dtype=getattr(torch, dtype) if dtype else None)
            tokenizer = load_tokenizer(path)
        seconds = time.perf_counter() - started
        nbytes = checkpoint_size(path)
        if tier == "ssd" and self.spec.ssd_bandwidth:
            # The topology caps this tier's bandwidth (an experiment on one machine): honour it.
            pause = nbytes / self.spec.ssd_bandwidth - seconds
            if pause > 0:
                time.sleep(pause)
                seconds += pause
        if tier in ("ssd", "dram"):
            self._tell(tier, TierLoaded(model, nbytes, seconds))
        if tokenizer is None:
            raise ValueError(f"{Path(path).name}: the checkpoint has no tokenizer files")
        memory = sum(p.numel() * p.element_size() for p in hf_model.parameters())
        return Loaded(hf_model, tokenizer, tier, memory)
