"""How a model instance obtains its weights: through the node's storage tier actors.

Fastest first: the DRAM tier (a host copy), then the SSD tier (our checkpoint format on local
disk), then the repository (download or convert, then stored on SSD; or fetched over HTTP, loaded as it
arrives). A load from SSD or the
repository leaves a copy in DRAM, so the next cold start of that model on this node is a DRAM hit.
A copy that fails its checksums is dropped and fetched again from the tier above; with no good
copy anywhere the load fails with the error naming file and tensor.

Typed client functions over the tier actors, so instances never build raw tier messages.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm_actors.actors.node import dram_tier
from sllm_actors.actors.node.baseline_loader import BaselineLoader
from sllm_actors.actors.node.dram_tier import DramTierActor
from sllm_actors.actors.node.repository_tier import RepositoryTierActor
from sllm_actors.actors.node import ssd_tier
from sllm_actors.actors.node.ssd_tier import SsdTierActor
from sllm_actors.actors.node.tier_common import drop_copy, hold_to_rate, release_lease, report_load
from sllm_actors.messages import Fetch, TierLookup
from sllm_actors.actors.node.context import Loaded, NodeContext
from sllm_actors.runtime.supervisor import ChildSpec
from sllm_actors.runtime.topology import NodeSpec

if TYPE_CHECKING:  # the storage package imports torch: nodes import it when they load, not before
    from sllm_actors.storage import HttpCheckpointFetch

__all__ = ["LOAD_PARTS", "SERIAL_PARTS", "StorageClient", "format_parts", "http_staging_root", "is_checkpoint_fault"]

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 900.0
"""A first fetch of the default model downloads and converts it; later ones are instant."""
ASK_TIMEOUT_S = 60.0
PIPELINED_FETCH = os.environ.get("SLLM_PIPELINED_FETCH", "1") != "0"
"""A repository checkpoint in our format loads while the SSD tier copies it; ``SLLM_PIPELINED_FETCH=0``
stores it first, then loads (the way it was: what benchmarks compare against)."""


def dram_meta_root(spec: NodeSpec) -> Path:
    """Where a node's DRAM tier keeps the small files of the checkpoints it holds: beside the SSD tier's
    directory (unique per node, and outside it, since the SSD tier owns everything inside)."""
    ssd = Path(spec.ssd_path)
    return ssd.with_name(f"{ssd.name}.dram")


def http_staging_root(spec: NodeSpec) -> Path:
    """Where a node's fetches over HTTP land before the SSD tier copies them: beside the SSD tier's directory,
    as the DRAM tier's files are (the SSD tier owns everything inside its own)."""
    ssd = Path(spec.ssd_path)
    return ssd.with_name(f"{ssd.name}.http")


class StorageClient:
    def __init__(self, node: NodeContext, spec: NodeSpec) -> None:
        self.node = node
        self.spec = spec
        # Building a transformers model touches process-wide state (default dtype and device, lazy
        # init flags): two instances building at once corrupt each other. Loads on a node take turns.
        self.build_lock = threading.Lock()
        self.tokenizers: dict[tuple[Any, ...], Any] = {}
        self.load_mode = spec.load_mode
        """``serverlessllm``: the tiers below; a baseline's mode: its own path (``baseline_loader``)."""
        self.baseline = BaselineLoader(node, spec, self.build_lock) if spec.load_mode != "serverlessllm" else None

    def child_specs(self) -> list[ChildSpec]:
        spec, node = self.spec, self.node
        return [
            ChildSpec("repository", lambda sup, name: RepositoryTierActor.start(
                sup, name, node=node, limit=spec.repository_bandwidth, repositories=spec.repositories,
                staging=http_staging_root(spec))),
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

    def load(self, model: str, source: str, device: str, dtype: str = "") -> Loaded:
        """The model on ``device``, from the fastest tier holding it, in ``dtype`` (a torch dtype name; empty
        keeps the stored one); ``Loaded.parts`` says where the time went (``LOAD_PARTS``)."""
        from sllm_actors.storage import CheckpointError

        if self.baseline is not None:
            return self.baseline.load(model, source, device, dtype)

        parts: dict[str, float] = {}
        started = time.perf_counter()
        hit = self._ask("dram", TierLookup(model))
        if hit is not None:
            parts["lookup"] = time.perf_counter() - started
            host, host_path = hit
            try:
                return self._build(model, device, "dram", path=host_path, host=host, parts=parts, dtype=dtype)
            finally:
                release_lease(self.node.directory, "dram", model)
        # The SSD copy (looked up or fetched) is leased until the DRAM tier has copied it, so a store of
        # another model cannot evict it mid-read.
        path = self._ask("ssd", TierLookup(model))
        parts["lookup"] = time.perf_counter() - started
        if path is None:
            loaded, path = self._from_repository(model, source, device, parts, dtype)
        else:
            try:
                loaded = self._build(model, device, "ssd", path=path, parts=parts, dtype=dtype)
            except CheckpointError as exc:
                # The SSD copy is bad: drop it and take a fresh one from the repository, once.
                log.warning("%s: %s on SSD failed verification: %s; fetching again", self.node.name, model, exc)
                self.node.event("corrupt", f"{model} on {self.node.name} ssd failed its checksums: {exc}",
                                {"model": model})
                release_lease(self.node.directory, "ssd", model)
                drop_copy(self.node.directory, "ssd", model, str(exc))
                loaded, path = self._from_repository(model, source, device, parts, dtype)
            except BaseException:
                release_lease(self.node.directory, "ssd", model)
                raise
        if path is not None:
            loaded.after_ready = lambda: self._store_in_dram(model, path)
        return loaded

    def _store_in_dram(self, model: str, path: str) -> None:
        """Hand a leased SSD copy to the DRAM tier, which releases the lease once it has copied it."""
        if not dram_tier.store_copy(self.node.directory, model, path, release="ssd"):
            release_lease(self.node.directory, "ssd", model)  # the DRAM tier is restarting: no copy this time

    def _from_repository(self, model: str, source: str, device: str, parts: dict[str, float],
                         dtype: str = "") -> tuple[Loaded, str | None]:
        """Fetch, store on SSD and load; returns the model and the SSD copy's path (leased; None when only
        the copy failed).

        A source already in our format is loaded straight from the repository while the SSD tier copies
        it (both read the same pages), so the start costs about the slower of the two, not their sum.
        Anything else is converted into the SSD tier first and loaded from there.
        """
        from sllm_actors.storage import HttpCheckpointFetch, checkpoint_size, is_checkpoint

        started = time.perf_counter()
        fetched = self._ask("repository", Fetch(model, source), timeout=FETCH_TIMEOUT_S)
        parts["fetch"] = time.perf_counter() - started
        if isinstance(fetched, HttpCheckpointFetch):
            return self._from_http(model, fetched, device, parts, dtype)
        local = str(fetched)
        ssd = self.node.directory.get("ssd")
        if ssd is None:
            raise RuntimeError(f"{self.node.name}: the ssd tier is restarting; try again")
        if not is_checkpoint(local) or not PIPELINED_FETCH:
            stored = time.perf_counter()
            path = str(ssd_tier.store(ssd, model, local, ASK_TIMEOUT_S).get(timeout=FETCH_TIMEOUT_S))
            parts["store"] = time.perf_counter() - stored
            report_load(self.node.directory, "repository", model, checkpoint_size(path),
                        time.perf_counter() - started)
            try:
                return self._build(model, device, "repository", path=path, parts=parts, dtype=dtype), path
            except BaseException:
                release_lease(self.node.directory, "ssd", model)
                raise
        copying = ssd_tier.store(ssd, model, local, ASK_TIMEOUT_S)
        try:
            # Read through the page cache, not around it: the copy reads the same pages at the same time, so
            # the disk is read once for both.
            loaded = self._build(model, device, "repository", path=local, parts=parts, dtype=dtype, direct_io=False)
        except BaseException:
            # The source is bad (or the build failed): wait for the copy so that nothing is left
            # behind in any tier (the copy checks the same checksums and removes itself on a mismatch).
            try:
                copying.get(timeout=FETCH_TIMEOUT_S)
            except Exception as exc:  # the copy's own failure: the load's error is the one to report
                log.debug("%s: copying %s to ssd failed too: %s", self.node.name, model, exc)
            else:
                release_lease(self.node.directory, "ssd", model)
                drop_copy(self.node.directory, "ssd", model, "its load from the repository failed")
            raise
        # The model is verified and on the device: it serves now, and the SSD copy finishes behind it. Waiting
        # for the copy would hold the first token for a disk write that serving does not need (on the GPU
        # machine a 16 GB copy alone takes 10.6 s, most of it writing).
        threading.Thread(target=self._finish_store, args=(model, copying, started), daemon=True,
                         name=f"sllm-store-{model}").start()
        return loaded, None

    def _from_http(self, model: str, fetch: HttpCheckpointFetch, device: str, parts: dict[str, float],
                   dtype: str = "") -> tuple[Loaded, str | None]:
        """A fetch over HTTP under way (index, config and tokenizer in; partitions arriving): the load reads each
        chunk once it has arrived and been checked (``fetch.wait``), so it starts on the first bytes, not after the
        last. Once the fetch is whole the SSD tier copies it (behind the serving model) and the staging copy
        goes. A fetch that fails (a bad checksum, a repository that gave up) fails the load and leaves nothing in
        any tier. ``SLLM_PIPELINED_FETCH=0`` waits for the whole fetch and its SSD copy before the load."""
        try:
            if not PIPELINED_FETCH:
                stored = time.perf_counter()
                fetch.result(timeout=FETCH_TIMEOUT_S)
                parts["fetch"] += time.perf_counter() - stored
                ssd = self.node.directory.get("ssd")
                if ssd is None:
                    raise RuntimeError(f"{self.node.name}: the ssd tier is restarting; try again")
                stored = time.perf_counter()
                path = str(ssd_tier.store(ssd, model, str(fetch.path), ASK_TIMEOUT_S).get(timeout=FETCH_TIMEOUT_S))
                parts["store"] = time.perf_counter() - stored
                fetch.discard()
                try:
                    return self._build(model, device, "repository", path=path, parts=parts, dtype=dtype), path
                except BaseException:
                    release_lease(self.node.directory, "ssd", model)
                    raise
            loaded = self._build(model, device, "repository", path=str(fetch.path), parts=parts, dtype=dtype,
                                 direct_io=False, arrival=fetch)
        except BaseException as exc:
            fetch.cancel()  # removes the staging copy; the SSD tier was never asked for one
            # A fetch that failed first (a bad checksum) removed its staging copy, so a load that opened it after
            # reports only the missing files: the fetch's error is the one that names the problem.
            if fetch.error is not None and fetch.error is not exc:
                raise fetch.error from exc
            raise
        threading.Thread(target=self._store_fetched, args=(model, fetch), daemon=True,
                         name=f"sllm-store-{model}").start()
        return loaded, None

    def _store_fetched(self, model: str, fetch: HttpCheckpointFetch) -> None:
        """Behind a model loaded from a fetch over HTTP: the fetch whole into the SSD tier (which checks every chunk
        again as it copies), then on into DRAM; the staging copy goes either way. The repository tier's bandwidth
        came from the fetch itself, so this copy is not counted for it."""
        try:
            fetch.result(timeout=FETCH_TIMEOUT_S)
            ssd = self.node.directory.get("ssd")
            if ssd is None:
                raise RuntimeError(f"{self.node.name}: the ssd tier is restarting")
            stored = time.perf_counter()
            path = str(ssd_tier.store(ssd, model, str(fetch.path), ASK_TIMEOUT_S).get(timeout=FETCH_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - the model serves; only its cached copy failed
            log.warning("%s: %s is loaded, but its SSD copy failed: %s", self.node.name, model, exc)
            self.node.event("error", f"{model} on {self.node.name}: SSD copy failed: {exc}", {"model": model})
            return
        finally:
            fetch.discard()
        seconds = time.perf_counter() - stored
        self.node.event("store", f"{model} stored on {self.node.name}'s SSD in {seconds:.1f}s, behind its load",
                        {"model": model, "seconds": seconds})
        self._store_in_dram(model, path)

    def _finish_store(self, model: str, copying: Any, started: float) -> None:
        """Settle a repository copy that a pipelined load left running: count it for the repository tier's
        bandwidth and hand the SSD copy to the DRAM tier (which releases its SSD lease when it has copied it)."""
        from sllm_actors.storage import checkpoint_size

        try:
            path = str(copying.get(timeout=FETCH_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - the model serves; only its cached copy failed
            # The copy removed itself (a full disk, say), so no tier holds a partial one, and the next cold
            # start fetches again.
            log.warning("%s: %s is loaded, but its SSD copy failed: %s", self.node.name, model, exc)
            self.node.event("error", f"{model} on {self.node.name}: SSD copy failed: {exc}", {"model": model})
            return
        seconds = time.perf_counter() - started
        report_load(self.node.directory, "repository", model, checkpoint_size(path), seconds)
        self.node.event("store", f"{model} stored on {self.node.name}'s SSD in {seconds:.1f}s, behind its load",
                        {"model": model, "seconds": seconds})
        self._store_in_dram(model, path)

    def _tokenizer(self, path: str) -> Any:
        from sllm_actors.storage import load_tokenizer

        key = self._tokenizer_key(path)
        cached = self.tokenizers.get(key) if key else None
        if cached is not None:
            return cached
        tokenizer = load_tokenizer(path)
        if key and tokenizer is not None:
            self.tokenizers[key] = tokenizer
        return tokenizer

    @staticmethod
    def _tokenizer_key(path: str) -> tuple[Any, ...] | None:
        # Keyed by the files' contents' identity, not by the model's name: a redeployed model with the
        # same name but another tokenizer gets its own. Tokenizers are not mutated by the engine.
        root = Path(path)
        key: list[Any] = []
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "special_tokens_map.json"):
            try:
                st = (root / name).stat()
            except OSError:
                continue
            key.append((name, st.st_size, st.st_mtime_ns))
        return tuple(key) or None

    def _build(self, model: str, device: str, tier: str, *, path: str, host: Any = None,
               parts: dict[str, float] | None = None, dtype: str = "", **loader_kwargs: Any) -> Loaded:
        import torch

        from sllm_actors.storage import checkpoint_size, load_model

        parts = parts if parts is not None else {}
        waited = time.perf_counter()
        with self.build_lock:
            started = time.perf_counter()
            parts["queue"] = started - waited
            # The tokenizer is read while the weights load (its parsing is mostly native code), and kept
            # for the next load of the same files.
            def read_tokenizer() -> Any:
                tok_started = time.perf_counter()
                try:
                    return self._tokenizer(path)
                finally:
                    parts["tokenizer"] = time.perf_counter() - tok_started

            with ThreadPoolExecutor(1, thread_name_prefix="sllm-tokenizer") as pool:
                tok_future = pool.submit(read_tokenizer)
                timings: dict[str, float] = {}
                hf_model = load_model(path, device, host=host, timings=timings,
                                      dtype=getattr(torch, dtype) if dtype else None, **loader_kwargs)
                loaded_at = time.perf_counter()
                tokenizer = tok_future.result()
                parts["tokenizer_wait"] = time.perf_counter() - loaded_at
            parts.update(timings)
        seconds = time.perf_counter() - started
        nbytes = checkpoint_size(path)
        if tier == "ssd" and self.spec.ssd_bandwidth:
            # The topology caps this tier's bandwidth (an experiment on one machine): honour it.
            pause = hold_to_rate(nbytes, self.spec.ssd_bandwidth, seconds)
            if pause:
                seconds += pause
                parts["throttle"] = pause
        if tier in ("ssd", "dram"):
            report_load(self.node.directory, tier, model, nbytes, seconds)
        if tokenizer is None:
            raise ValueError(f"{Path(path).name}: the checkpoint has no tokenizer files")
        memory = sum(p.numel() * p.element_size() for p in hf_model.parameters())
        return Loaded(hf_model, tokenizer, tier, memory, parts)


LOAD_PARTS = ("lookup", "fetch", "store", "queue", "config", "read", "build", "read_wait", "assign",
              "tokenizer", "tokenizer_wait", "kv_pool", "norms", "warmup", "throttle",
              "download_queue", "download", "process_start", "from_pretrained", "to_device")
"""The parts of a load, in seconds. ``lookup``: asking the tiers; ``fetch``: the repository's answer;
``store``: converting into the SSD tier before the load (a source not in our format; a source in our format is
copied behind the load, and the copy is not part of it); ``queue``: waiting for another load on the node;
``config``: index and config files; ``read``: weights to the device (file or host copy -> device, on its
own thread); ``build``: the model's skeleton, meanwhile; ``read_wait``: the read beyond the build; ``assign``:
weights into the skeleton; ``tokenizer`` (alongside) and ``tokenizer_wait`` (beyond the weights); the engine's
set-up, timed by the instance: ``kv_pool`` (allocating the paged KV cache), ``norms`` (checking the model's RMS
norms against the fused kernel before switching them), ``warmup`` (a short prefill and decode step through the
path the engine serves by, so the first request finds kernels loaded; 0 where this node already ran the same
model that way); ``throttle``: a topology's bandwidth cap. A baseline's load (``baseline_loader``):
``download_queue`` (another download on the node), ``download`` (the checkpoint copied from the repository),
``process_start`` (``kserve``'s fresh server process), ``from_pretrained`` (transformers' own load of the copy),
``to_device``, ``tokenizer_wait`` (parsed after the weights). Overlapping parts (``read``/``build``,
``tokenizer``) do not add up; the others do."""

SERIAL_PARTS = ("lookup", "fetch", "store", "queue", "config", "build", "read_wait", "assign", "tokenizer_wait",
                "kv_pool", "norms", "warmup", "throttle", "download_queue", "download", "process_start",
                "from_pretrained", "to_device")


def format_parts(parts: dict[str, float], minimum: float = 0.005) -> str:
    """The serial parts worth a mention, largest first: ``read_wait 0.31s, build 0.12s``."""
    shown = sorted(((v, k) for k, v in parts.items() if k in SERIAL_PARTS and v >= minimum), reverse=True)
    return ", ".join(f"{k} {v:.2f}s" for v, k in shown) or "all parts under 5 ms"


def is_checkpoint_fault(exc: BaseException) -> bool:
    """Whether a load failed for its checkpoint's sake (corrupt or truncated bytes, a missing or malformed file,
    a repository that refused it): any GPU would fail it the same, so it is no sign of a sick device."""
    from sllm_actors.storage import CheckpointError, FetchError

    return isinstance(exc, (CheckpointError, FetchError, FileNotFoundError, NotADirectoryError, ValueError))
