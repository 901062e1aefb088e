"""CUDA graphs for engine steps: captured lazily, one shape at a time, replayed for the live batch.

A decode-only step of a small model is a chain of a thousand tiny kernels, whose launches cost more than their
work; a captured graph launches them as one. The live batch is padded to the next size of a ladder (batch sizes
× context lengths in blocks), so few shapes serve every batch. Capture happens between steps, one shape at a time,
only for a shape the engine has already served eagerly: a cold start's first tokens never wait for a capture
(vLLM captures every size before serving, tens of seconds on a cold start). Anything that cannot be captured is
served eagerly, with a log line saying why.

Prefill steps (the prompts that arrived since the last step, packed in one forward) are captured too, per padded
shape (tokens and context to powers of two, sampled rows to a power of two from 8; :class:`PrefillGraph`): an eager prefill of a small model is ~30 ms of host
time on an H200 (a thousand launches through transformers' Python), and under a burst of arrivals every new
request waits behind it. Attention stays inside the graph: the step's whole context is gathered from the cache
under a block-diagonal causal mask built on the device from per-token segment ids, so one graph serves any mix
of prompts whose padded sizes match. The eager step of such a shape runs the same padded forward, so a replay
computes what the eager step did.

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


PREFILL_CAPTURE_AFTER_USES = 1
"""A prefill shape is captured at its second use (decode shapes at their third): a burst's shapes recur once per
burst, not once per step, and the cold start's first prefill still runs eagerly."""
MAX_PREFILL_GRAPHS = 48
"""At most this many prefill shapes are captured per runner (each capture holds a step back by about two forwards,
and each graph keeps its logits buffer); later shapes run eagerly, padded."""
PREFILL_MIN_TOKENS = 16
"""The smallest padded prefill: prefill shapes are powers of two from here."""


def pow2_bucket(n: int, least: int = PREFILL_MIN_TOKENS) -> int:
    """The power of two (at least ``least``) a prefill's token or context count is padded to."""
    size = least
    while size < n:
        size *= 2
    return size


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


PrefillShape = tuple[int, int, int]
"""A padded prefill step: (query tokens, context tokens, sampled rows)."""

PrefillForward = Callable[[torch.Tensor, PrefillShape], torch.Tensor]
"""The runner's padded prefill forward: (the step's inputs as one tensor, its shape) to the sampled rows' logits."""


def prefill_input_size(shape: PrefillShape) -> int:
    """Length of a padded prefill's input tensor: token ids, positions, slots and segments of the queries (4 x
    tokens), slots, segments and positions of the context (3 x context), then the rows to sample."""
    tokens, context, rows = shape
    return 4 * tokens + 3 * context + rows


class PrefillGraph:
    """One captured prefill step of a padded shape; a replay copies the step's inputs into its persistent ones."""

    def __init__(self, forward: PrefillForward, device: torch.device, shape: PrefillShape, pool: Any,
                 capture_stream: Any) -> None:
        self.shape = shape
        # Zeros are valid inputs: token 0 at position 0 in segment 0, its keys in slot 0 (the scratch block's),
        # context of that slot alone, row 0 sampled: the warm-up and the capture write only the scratch block.
        self.inputs = torch.zeros(prefill_input_size(shape), dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            forward(self.inputs, shape)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), \
                torch.cuda.graph(self.graph, pool=pool, stream=capture_stream, capture_error_mode="thread_local"):
            self.logits = forward(self.inputs, shape)

    def replay(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the step for ``inputs`` (a host tensor laid out as :func:`prefill_input_size` says); returns the
        logits of every sampled row, padding included."""
        self.inputs.copy_(inputs, non_blocking=True)
        self.graph.replay()
        return self.logits


class StepGraphs:
    """A runner's captured steps by shape, and when to capture one: decodes by (padded batch, context blocks),
    prefills by (tokens, context, sampled rows)."""

    def __init__(self, device: torch.device, block_size: int, *, enabled: bool, max_batch: int,
                 max_blocks: int, prefill: bool = False) -> None:
        self.device = device
        self.block_size = block_size
        self.enabled = enabled and device.type == "cuda"
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.note = "" if self.enabled else ("no CUDA graphs on a CPU" if device.type != "cuda"
                                             else "CUDA graphs off by configuration")
        """Why decode steps run eagerly, when they do."""
        self.capture_s = 0.0
        self.prefill_enabled = self.enabled and prefill
        """Whether prefill steps are captured (off after a failed prefill capture; decodes go on)."""
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        self._prefills: dict[PrefillShape, PrefillGraph] = {}
        self._uses: dict[tuple[int, ...], int] = {}
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

    def prefill_for(self, shape: PrefillShape, forward: PrefillForward) -> PrefillGraph | None:
        """The prefill graph of this padded shape, captured now (running ``forward``) once the shape has been
        served eagerly often enough; None: serve the step eagerly (with the same padded forward)."""
        graph = self._prefills.get(shape)
        if graph is None and self.prefill_enabled and len(self._prefills) < MAX_PREFILL_GRAPHS:
            self._uses[shape] = self._uses.get(shape, 0) + 1
            if self._uses[shape] > PREFILL_CAPTURE_AFTER_USES and time.monotonic() >= self._retry_at:
                graph = self._capture_prefill(shape, forward)
        return graph

    def _ensure_pool(self) -> None:
        """The memory pool and side stream every graph of this device shares (decode and prefill alike), made at
        the first capture."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(self.device)

    def _capture_prefill(self, shape: PrefillShape, forward: PrefillForward) -> PrefillGraph | None:
        started = time.perf_counter()
        try:
            self._ensure_pool()
            with capturing(self.device) as refused:
                if refused:
                    if refused != "capture":
                        self._retry_at = time.monotonic() + CAPTURE_RETRY_S
                    log.debug("prefill graph %s: %s busy (%s), captured later", shape, self.device, refused)
                    return None
                graph = PrefillGraph(forward, self.device, shape, self._pool, self._stream)
        except Exception as exc:  # any capture failure: prefills run eagerly from now on, decodes keep theirs
            log.warning("CUDA graph capture of prefill %s (tokens, context, rows) failed, prefills run eagerly: %s",
                        shape, exc)
            self.prefill_enabled = False
            self.note = f"prefill capture failed: {exc}"
            return None
        self._prefills[shape] = graph
        self.capture_s += time.perf_counter() - started
        log.info("captured prefill graph %s (tokens, context, rows) in %.0f ms", shape,
                 1000 * (time.perf_counter() - started))
        return graph

    def _capture(self, batch: int, n_blocks: int, forward: DecodeForward) -> DecodeGraph | None:
        started = time.perf_counter()
        try:
            self._ensure_pool()
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
        """The decode shapes captured."""
        return sorted(self._graphs)

    @property
    def prefill_shapes(self) -> list[PrefillShape]:
        return sorted(self._prefills)


__all__ = ["BATCH_LADDER", "CAPTURE_AFTER_USES", "CAPTURE_RETRY_S", "MAX_PREFILL_GRAPHS", "PREFILL_CAPTURE_AFTER_USES",
           "PREFILL_MIN_TOKENS", "DecodeForward",
           "DecodeGraph", "PrefillForward", "PrefillGraph", "PrefillShape", "StepGraphs", "batch_bucket",
           "pow2_bucket", "prefill_input_size"]
