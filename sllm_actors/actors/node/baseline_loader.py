"""The paper's baselines' way of loading a model, run by the same node, so that a comparison isolates what
ServerlessLLM's loading and placement add (``scheduler.load_mode`` in the topology):

* ``rayserve``: each cold start downloads the model's safetensors checkpoint from the model repository to the
  node's disk, then loads that copy with transformers' ``from_pretrained``; the copy is deleted when the
  instance unloads (a Ray Serve replica's working directory goes with it).
* ``rayserve-cache``: the same, but the copy is kept on the node's disk, LRU within the SSD tier's capacity,
  and a later cold start of the model on this node loads the kept copy without downloading.
* ``kserve``: a storage initializer downloads the whole checkpoint, then a fresh server process starts and
  loads it. The process start is real: a new Python process imports torch and transformers, resolves the
  model's class and (on CUDA) starts a CUDA context, and its wall time counts. The load that follows runs in
  the node's process, where the engine serves (the one thing emulated: the fresh process is not the one
  that serves). The copy is deleted at unload (a pod's ``emptyDir`` volume).

What is real in every mode: the bytes copied from the repository (file by file, paced at the topology's
``repository.bandwidth``, the figure our repository tier's fetches are held to, one download at a time per
node as the repository tier fetches), and ``from_pretrained`` on the copied safetensors files, the tokenizer
parsed afresh. A read of the local copy is held to ``ssd.bandwidth`` where the topology sets one, as our SSD
tier's reads are. None of the storage tiers (DRAM, SSD, our format) is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from sllm_actors.actors.node.context import Loaded, NodeContext
from sllm_actors.actors.node.tier_common import hold_to_rate, report_load
from sllm_actors.runtime.topology import NodeSpec

__all__ = [
    "BASELINE_MODES",
    "COMPLETE",
    "BaselineLoader",
    "CopyCache",
    "baseline_dir",
    "paced_copy",
    "safetensors_bytes",
    "start_server_process",
]

log = logging.getLogger(__name__)

BASELINE_MODES = ("rayserve", "rayserve-cache", "kserve")
CHUNK_BYTES = 8 * 1024 * 1024
"""A download's copy unit: small enough that the pacing holds the link's rate within a chunk's time."""
SERVER_START_TIMEOUT_S = 300.0
COMPLETE = ".complete"
"""Written last into a kept copy: a copy without it was cut short (a crash mid-download) and is not used."""

_SERVER_START = r"""
import sys, time
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # what a model server imports
path, device = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(path)
for name in getattr(config, "architectures", None) or []:
    getattr(transformers, name, None)  # the model's own modeling module, imported lazily otherwise
if device.startswith("cuda"):
    torch.zeros(1, device=device)  # the server's CUDA context
    torch.cuda.synchronize(device)
"""
"""What a fresh model-server process does before it can load: its imports, the model's code, its device."""


def baseline_dir(ssd_path: str | os.PathLike[str], mode: str) -> Path:
    """Where a node's ``mode`` keeps its downloaded copies: beside the SSD tier's directory, on the same disk
    (the SSD tier owns everything inside its own)."""
    ssd = Path(ssd_path)
    return ssd.with_name(f"{ssd.name}.{mode}")


def safetensors_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the checkpoint's files a download copies (weights, config, tokenizer: everything in it)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def paced_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str], limit: float | None) -> int:
    """Copy the directory ``src`` to ``dest`` (written under a temporary name, renamed when whole), no faster
    than ``limit`` bytes/s (None or 0: disk speed). Returns the bytes copied."""
    src, dest = Path(src), Path(dest)
    partial = dest.with_name(f"{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()
    copied = 0
    try:
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            target = partial / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(file, "rb") as fin, open(target, "wb") as fout:
                while chunk := fin.read(CHUNK_BYTES):
                    fout.write(chunk)
                    copied += len(chunk)
                    if limit:
                        # The link's rate: never ahead of what ``limit`` would have delivered by now.
                        ahead = copied / limit - (time.perf_counter() - started)
                        if ahead > 0:
                            time.sleep(ahead)
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return copied


def start_server_process(path: str | os.PathLike[str], device: str, timeout: float = SERVER_START_TIMEOUT_S) -> float:
    """Start a fresh Python process that does what a model server does before it loads (imports, the model's
    class, the device's context), wait for it to finish, and return its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _SERVER_START, str(path), device], capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the server process exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - started


class CopyCache:
    """``rayserve-cache``'s kept copies: LRU within a capacity, never evicting a copy being read.

    A pure record of what is kept (model -> bytes) and what is leased; the loader deletes what ``admit``
    says to evict."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.leases: dict[str, int] = {}

    def hit(self, model: str) -> bool:
        """Whether ``model`` is kept; a hit is leased (until ``release``) and becomes the most recent."""
        if model not in self.entries:
            return False
        self.entries.move_to_end(model)
        self.leases[model] = self.leases.get(model, 0) + 1
        return True

    def release(self, model: str) -> None:
        left = self.leases.get(model, 0) - 1
        if left > 0:
            self.leases[model] = left
        else:
            self.leases.pop(model, None)

    def room_for(self, nbytes: int) -> list[str] | None:
        """The least recent unleased copies to evict so that ``nbytes`` more fit (None: they never will)."""
        free = self.capacity - sum(self.entries.values())
        evict: list[str] = []
        for model, size in self.entries.items():
            if free >= nbytes:
                break
            if self.leases.get(model):
                continue
            evict.append(model)
            free += size
        return evict if free >= nbytes else None

    def add(self, model: str, nbytes: int) -> None:
        """``model``'s copy is kept (leased for the load that made it)."""
        self.entries[model] = nbytes
        self.entries.move_to_end(model)
        self.leases[model] = self.leases.get(model, 0) + 1

    def remove(self, model: str) -> None:
        self.entries.pop(model, None)


class BaselineLoader:
    """Loads models the way ``spec.load_mode`` (one of ``BASELINE_MODES``) says; see the module's docstring."""

    def __init__(self, node: NodeContext, spec: NodeSpec, build_lock: threading.Lock) -> None:
        if spec.load_mode not in BASELINE_MODES:
            raise ValueError(f"{spec.name}: {spec.load_mode!r} is not a baseline load mode ({', '.join(BASELINE_MODES)})")
        self.node = node
        self.spec = spec
        self.mode = spec.load_mode
        self.build_lock = build_lock
        # The node's one link to the repository: downloads take turns, as our repository tier's fetches do.
        self.download_lock = threading.Lock()
        self.cache_lock = threading.Lock()
        self.root = baseline_dir(spec.ssd_path, self.mode)
        self.cache = CopyCache(spec.ssd_bytes)
        if self.mode == "rayserve-cache":
            self._scan()
        else:
            # Per-instance copies die with their instance; any left here are from a node that was killed.
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def _scan(self) -> None:
        """Kept copies from before a restart (whole ones only) are kept still."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime):
            if entry.is_dir() and (entry / COMPLETE).is_file():
                self.cache.entries[entry.name] = safetensors_bytes(entry)
            elif entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)  # cut short: not a copy to load from
            else:
                entry.unlink(missing_ok=True)

    def load(self, model: str, source: str, device: str, dtype: str = "") -> Loaded:
        from sllm_actors.models import resolve_source

        parts: dict[str, float] = {}
        started = time.perf_counter()
        repo_path = resolve_source(source)
        if not any(repo_path.glob("*.safetensors")):
            raise ValueError(f"{repo_path}: load mode {self.mode} needs a safetensors checkpoint (model.safetensors"
                             " as transformers' save_pretrained writes it), and there is none")
        if self.mode == "rayserve-cache":
            with self.cache_lock:
                hit = self.cache.hit(model)
            parts["lookup"] = time.perf_counter() - started
            copy = self.root / model
            if not hit:
                self._download(model, repo_path, copy, parts, cached=True)
            tier = "ssd" if hit else "repository"

            def release() -> None:
                with self.cache_lock:
                    self.cache.release(model)
            try:
                loaded = self._from_pretrained(model, copy, device, dtype, tier, parts)
            finally:
                release()  # read in full: an eviction can no longer hurt this instance
            return loaded
        parts["lookup"] = time.perf_counter() - started
        copy = self.root / f"{model}.{uuid.uuid4().hex[:8]}"
        self._download(model, repo_path, copy, parts, cached=False)
        try:
            if self.mode == "kserve":
                parts["process_start"] = start_server_process(copy, device)
            loaded = self._from_pretrained(model, copy, device, dtype, "repository", parts)
        except BaseException:
            shutil.rmtree(copy, ignore_errors=True)
            raise
        loaded.on_unload = lambda: self._delete(model, copy)
        return loaded

    def _download(self, model: str, repo_path: Path, copy: Path, parts: dict[str, float], *, cached: bool) -> None:
        waited = time.perf_counter()
        with self.download_lock:
            started = time.perf_counter()
            parts["download_queue"] = started - waited
            if cached:
                with self.cache_lock:
                    if self.cache.hit(model):  # another instance on this node downloaded it meanwhile
                        parts["download"] = 0.0
                        return
                    evict = self.cache.room_for(safetensors_bytes(repo_path))
                    if evict is None:
                        raise RuntimeError(f"{model} does not fit in {self.node.name}'s disk cache "
                                           f"({self.cache.capacity} bytes, the rest leased)")
                    for old in evict:
                        self.cache.remove(old)
                for old in evict:
                    shutil.rmtree(self.root / old, ignore_errors=True)
                    self.node.event("evict", f"{old}'s {self.mode} copy evicted from {self.node.name}'s disk",
                                    {"model": old, "load_mode": self.mode})
            nbytes = paced_copy(repo_path, copy, self.spec.repository_bandwidth)
            if cached:
                (copy / COMPLETE).touch()
                with self.cache_lock:
                    self.cache.add(model, nbytes)
            seconds = time.perf_counter() - started
            parts["download"] = seconds
        report_load(self.node.directory, "repository", model, nbytes, seconds)

    def _from_pretrained(self, model: str, copy: Path, device: str, dtype: str, tier: str,
                         parts: dict[str, float]) -> Loaded:
        import torch
        from transformers import AutoModelForCausalLM

        from sllm_actors.storage import load_tokenizer

        waited = time.perf_counter()
        # Building a transformers model touches process-wide state: loads on a node take turns (as ours do).
        with self.build_lock:
            started = time.perf_counter()
            parts["queue"] = started - waited
            hf_model = AutoModelForCausalLM.from_pretrained(copy, dtype=getattr(torch, dtype) if dtype else "auto")
            loaded_at = time.perf_counter()
            parts["from_pretrained"] = loaded_at - started
            hf_model.to(torch.device(device))
            if torch.device(device).type == "cpu":
                # On a CPU, from_pretrained leaves every parameter mapped from the safetensors file, so `.to("cpu")`
                # copies nothing; on a GPU `.to` copies the weights into device memory, as our loader does on
                # both. Charging the copy here keeps the CPU comparison the GPU's (to_device counts it).
                with torch.no_grad():
                    for param in hf_model.parameters():
                        param.data = param.data.clone()
            hf_model.eval()
            moved = time.perf_counter()
            parts["to_device"] = moved - loaded_at
            tokenizer = load_tokenizer(copy)
            parts["tokenizer_wait"] = time.perf_counter() - moved
        read_s = parts["from_pretrained"] + parts["to_device"]
        weights = sum(p.stat().st_size for p in copy.glob("*.safetensors"))
        if self.spec.ssd_bandwidth:
            # The topology caps the local disk's reads (our SSD tier's loads are held to the same figure).
            pause = hold_to_rate(weights, self.spec.ssd_bandwidth, read_s)
            if pause:
                parts["throttle"] = pause
        if tokenizer is None:
            raise ValueError(f"{copy.name}: the checkpoint has no tokenizer files")
        memory = sum(p.numel() * p.element_size() for p in hf_model.parameters())
        return Loaded(hf_model, tokenizer, tier, memory, parts, mode=self.mode)

    def _delete(self, model: str, copy: Path) -> None:
        shutil.rmtree(copy, ignore_errors=True)
        self.node.event("delete", f"{model}'s {self.mode} copy deleted from {self.node.name}'s disk at unload",
                        {"model": model, "load_mode": self.mode})
