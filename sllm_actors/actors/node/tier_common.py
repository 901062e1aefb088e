"""What the storage tier actors share: the messages every tier takes (as client functions), bandwidth
bookkeeping and the start-up measurements."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sllm_actors.messages import TierDrop, TierLoaded, TierRelease
from sllm_actors.runtime.supervisor import Directory

__all__ = [
    "Bandwidth",
    "drop_copy",
    "hold_to_rate",
    "measure_disk_read",
    "measure_host_copy",
    "release_lease",
    "report_load",
]

PROBE_BYTES = 64 * 1024 * 1024


# ------------------------------------------------------------------ client functions
# Every tier (``repository``, ``ssd``, ``dram``: its name in the node's directory) takes these; each returns
# False when the tier is not there (restarting), as ``Directory.tell`` does.


def release_lease(directory: Directory, tier: str, model: str) -> bool:
    """End one lease on ``tier``'s copy of ``model`` (taken by a lookup or a store): it may be evicted
    again."""
    return directory.tell(tier, TierRelease(model))


def drop_copy(directory: Directory, tier: str, model: str, reason: str) -> bool:
    """``tier``'s copy of ``model`` is bad (it failed its checksums, or its load failed): delete it."""
    return directory.tell(tier, TierDrop(model, reason))


def report_load(directory: Directory, tier: str, model: str, nbytes: int, seconds: float) -> bool:
    """A real load read ``nbytes`` from ``tier`` in ``seconds``: it refines the tier's measured bandwidth."""
    return directory.tell(tier, TierLoaded(model, nbytes, seconds))


def hold_to_rate(nbytes: int, rate: float, elapsed: float) -> float:
    """Sleep until moving ``nbytes`` has taken at least what ``rate`` bytes/s allows (the topology's stated
    bandwidth of a link or disk, so an experiment on one machine sees it), ``elapsed`` seconds having passed.
    Returns the pause (0 when the work was slower than the rate already)."""
    pause = nbytes / rate - elapsed
    if pause <= 0:
        return 0.0
    time.sleep(pause)
    return pause


class Bandwidth:
    """Bytes per second: measured at start, then refined from real loads (a moving average)."""

    def __init__(self, initial: float = 0.0, weight: float = 0.3) -> None:
        self.value = initial
        self.weight = weight
        self.samples = 0

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        rate = nbytes / seconds
        self.value = rate if self.samples == 0 and not self.value else (1 - self.weight) * self.value + self.weight * rate
        self.samples += 1


def measure_disk_read(folder: Path, nbytes: int = PROBE_BYTES) -> float:
    """Read bandwidth of the file system under ``folder`` with the page cache evicted (bytes/s)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".bandwidth-probe-{os.getpid()}"
    block = os.urandom(1024 * 1024)
    try:
        with open(probe, "wb") as f:
            for _ in range(nbytes // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(probe, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            started = time.perf_counter()
            while os.read(fd, 8 * 1024 * 1024):
                pass
            return nbytes / (time.perf_counter() - started)
        finally:
            os.close(fd)
    finally:
        probe.unlink(missing_ok=True)


def measure_host_copy(device: str = "cpu", nbytes: int = PROBE_BYTES) -> float:
    """Copy bandwidth from host memory to ``device`` (pinned host -> GPU on CUDA; memcpy on CPU)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.startswith("cuda"))
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)  # first touch, outside the timing
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - started)
