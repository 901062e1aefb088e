"""CUDA graphs for decode steps: captured lazily, one shape at a time, replayed for the live batch.

A decode-only step of a small model is a chain of a thousand tiny kernels, whose launches cost more than their
work; a captured graph launches them as one. The live batch is padded to the next size of a ladder (batch sizes
× context lengths in blocks), so few shapes serve every batch. Capture happens between steps, one shape at a time,
only for a shape the engine has already served eagerly: a cold start's first tokens never wait for a capture
(vLLM captures every size before serving, tens of seconds on a cold start). Anything that cannot be captured is
served eagerly, with a log line saying why.

The runner owns the forward; this module owns the graphs, their persistent inputs and the decision when to
capture. Padded rows write to and read only the scratch block (:data:`~sllm_actors.gpu.block_manager.SCRATCH_BLOCK`).

Engines sharing a device: a capture runs in CUDA's thread-local capture mode, on a stream of its own device, and
only with the device's gate held exclusive (:mod:`~sllm_actors.gpu.device_gate`), so another engine's step or a
load on the same GPU neither breaks it nor is broken by it. When the gate cannot be had (a load in flight), the
step runs eagerly and the capture is tried again after :data:`CAPTURE_RETRY_S` (at its next use when another
capture held the gate).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from sllm_actors.gpu.block_manager import SCRATCH_BLOCK
from sllm_actors.gpu.device_gate import capturing

log = logging.getLogger(__name__)

BATCH_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
CAPTURE_AFTER_USES = 2
"""A decode shape is captured once it has run this many times eagerly."""
CAPTURE_RETRY_S = 2.0
"""After a capture found its device busy (another engine's load in flight, or a step that would not end), no
capture is tried for this long: each try holds back the other engines' new steps for a moment."""

DecodeForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""The runner's decode forward: (token ids, positions, slots, block tables, context lengths) to logits."""


def batch_bucket(n: int) -> int:
    """The ladder's size a batch of ``n`` decodes is padded to (``n`` itself past the ladder's top)."""
    for size in BATCH_LADDER:
        if size >= n:
            return size
    return n


class DecodeGraph:
    """One captured decode step with its persistent inputs; a replay copies the live batch into them."""

    def __init__(self, forward: DecodeForward, device: torch.device, block_size: int, batch: int, n_blocks: int,
                 pool: Any, capture_stream: Any) -> None:
        self.batch = batch
        self.n_blocks = n_blocks
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.full((batch,), SCRATCH_BLOCK * block_size, dtype=torch.long, device=device)
        self.tables = torch.full((batch, n_blocks), SCRATCH_BLOCK, dtype=torch.long, device=device)
        self.lens = torch.ones(batch, dtype=torch.long, device=device)
        # Warm-up on a side stream (cuBLAS workspaces, lazy inits) writes only the scratch block: every slot
        # and table entry points there.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            forward(self.ids, self.positions, self.slots, self.tables, self.lens)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # Thread-local mode: what other threads do on the device meanwhile (an allocation, a copy) does not
        # invalidate this capture; the device gate keeps our own engines and loads off the device meanwhile. The
        # stream is this device's own (torch's shared default capture stream lives on whichever device was
        # current when it was first made), and torch.cuda.graph synchronises the *current* device on entry.
        with torch.cuda.device(device), \
                torch.cuda.graph(self.graph, pool=pool, stream=capture_stream, capture_error_mode="thread_local"):
            self.logits = forward(self.ids, self.positions, self.slots, self.tables, self.lens)

    def replay(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the step for ``inputs``, a decode step's host tensor ``[4 + n_blocks, batch]`` (see
        :func:`~sllm_actors.gpu.runner.decode_inputs`); returns the logits of every row, padding included."""
        dev = inputs.to(self.ids.device, non_blocking=True)
        self.ids.copy_(dev[0])
        self.positions.copy_(dev[1])
        self.slots.copy_(dev[2])
        self.lens.copy_(dev[3])
        self.tables.copy_(dev[4:].T)
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """A runner's captured decode steps by shape (padded batch, context blocks), and when to capture one."""

    def __init__(self, device: torch.device, block_size: int, *, enabled: bool, max_batch: int,
                 max_blocks: int) -> None:
        self.device = device
        self.block_size = block_size
        self.enabled = enabled and device.type == "cuda"
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.note = "" if self.enabled else ("no CUDA graphs on a CPU" if device.type != "cuda"
                                             else "CUDA graphs off by configuration")
        """Why decode steps run eagerly, when they do."""
        self.capture_s = 0.0
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        self._uses: dict[tuple[int, int], int] = {}
        self._pool: Any = None
        self._stream: Any = None
        self._retry_at = 0.0

    def for_shape(self, batch: int, n_blocks: int, forward: DecodeForward) -> DecodeGraph | None:
        """The graph of this shape, captured now (running ``forward``) if the shape has been served eagerly often
        enough; None: serve the step eagerly. The forward is passed in, not kept: held here, the runner's bound
        method would make a reference cycle, and an unloaded model's KV pool would wait for the cycle collector
        to give its GPU memory back."""
        key = (batch, n_blocks)
        graph = self._graphs.get(key)
        if graph is None and self.enabled and batch <= self.max_batch and n_blocks <= self.max_blocks:
            self._uses[key] = self._uses.get(key, 0) + 1
            if self._uses[key] > CAPTURE_AFTER_USES and time.monotonic() >= self._retry_at:
                graph = self._capture(batch, n_blocks, forward)
        return graph

    def _capture(self, batch: int, n_blocks: int, forward: DecodeForward) -> DecodeGraph | None:
        started = time.perf_counter()
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
                self._stream = torch.cuda.Stream(self.device)
            with capturing(self.device) as refused:
                if refused:
                    if refused != "capture":  # another capture is over in milliseconds: try at the next use
                        self._retry_at = time.monotonic() + CAPTURE_RETRY_S
                    log.debug("decode graph batch %d x %d blocks: %s busy (%s), captured later", batch, n_blocks,
                              self.device, refused)
                    return None
                graph = DecodeGraph(forward, self.device, self.block_size, batch, n_blocks, self._pool,
                                    self._stream)
        except Exception as exc:  # any capture failure: serve this shape eagerly from now on
            log.warning("CUDA graph capture of decode batch %d x %d blocks failed, serving it eagerly: %s",
                        batch, n_blocks, exc)
            self.enabled = False
            self.note = f"capture failed: {exc}"
            return None
        self._graphs[(batch, n_blocks)] = graph
        self.capture_s += time.perf_counter() - started
        log.info("captured decode graph batch %d x %d blocks in %.0f ms", batch, n_blocks,
                 1000 * (time.perf_counter() - started))
        return graph

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)


__all__ = ["BATCH_LADDER", "CAPTURE_AFTER_USES", "CAPTURE_RETRY_S", "DecodeForward", "DecodeGraph", "DecodeGraphs",
           "batch_bucket"]
