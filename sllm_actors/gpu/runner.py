"""The model runner: the paged KV pool's tensors, one forward per engine step.

A step's tokens go through the model packed in one row; :mod:`sllm_actors.gpu.attention` does the paging.
On CUDA, decode steps replay a graph of :mod:`sllm_actors.gpu.cuda_graphs` once their shape has been captured
(lazily, off the cold start's path); so do the prefill steps of new prompts when the engine asks for prefill
graphs (``prefill_graphs``), padded to a few shapes. Everything else runs eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from sllm_actors.gpu.attention import PrefillSegment, StepLayout, set_layout, use_paged_attention
from sllm_actors.gpu.block_manager import SCRATCH_BLOCK
from sllm_actors.gpu.cuda_graphs import PrefillShape, StepGraphs, batch_bucket, pow2_bucket

log = logging.getLogger(__name__)


FUSABLE_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm")
"""transformers' T5-style RMSNorms (weight * normalise(x in fp32) cast back), seven kernels each when eager."""


def fuse_rms_norms(model: Any) -> int:
    """Run the model's T5-style RMSNorms as ``torch.nn.functional.rms_norm`` (one fused kernel on CUDA): at batch 1
    a small model's decode step is a chain of ~1,300 tiny kernels, two per layer of which are norms of ~7 kernels.
    What a norm computes is its class's code, so the first module of each class is checked against its own forward
    on the device before that class's modules are switched (one check per module cost 65 device round trips on an
    8B model, at every load). Returns how many were switched."""
    import torch.nn.functional as F

    checked: dict[type, bool] = {}
    switched = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ not in FUSABLE_NORMS or not hasattr(module, "variance_epsilon"):
            continue
        weight, eps = module.weight, float(module.variance_epsilon)

        def fused(hidden: torch.Tensor, weight: torch.Tensor = weight, eps: float = eps) -> torch.Tensor:
            return weight * F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps).to(hidden.dtype)

        if cls not in checked:
            # Drawn on the host from a generator of its own, then copied: the device's default generator is
            # shared by every engine in the process, and a draw on it while another engine captures a CUDA graph
            # fails (and after a failed capture, fails for ever).
            host = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0))
            probe = host.to(weight.device, weight.dtype)
            with torch.inference_mode():
                expected, got = module.forward(probe).float(), fused(probe).float()
            checked[cls] = bool(torch.allclose(expected, got, rtol=1e-2, atol=1e-2))
            if not checked[cls]:
                log.info("%s differs from rms_norm; kept as it is", cls.__name__)
        if checked[cls]:
            module.forward = fused
            switched += 1
    return switched


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    layers, kv_heads, head_dim = model_dims(config)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def model_dims(config: Any) -> tuple[int, int, int]:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


@dataclass
class Feed:
    """One request's tokens in a step: ``ids`` at positions ``start ..``, its cache blocks ``table``."""

    ids: list[int]
    start: int
    table: list[int]
    sample: bool
    """Whether this step needs the logits of its last token."""


def _slot(table: list[int], position: int, block_size: int) -> int:
    """The cache slot of a request's token at ``position``, from its block table."""
    return table[position // block_size] * block_size + position % block_size


def _padded_tables(feeds: list[Feed], n_blocks: int) -> list[list[int]]:
    """Each feed's first ``n_blocks`` blocks, padded with the scratch block."""
    return [(f.table[:n_blocks] + [SCRATCH_BLOCK] * n_blocks)[:n_blocks] for f in feeds]


def decode_inputs(feeds: list[Feed], rows: int, n_blocks: int, block_size: int) -> torch.Tensor:
    """A decode step's inputs as one host tensor ``[4 + n_blocks, rows]``: token ids, positions, slots, context
    lengths, then the block tables (transposed). Rows past the feeds are padding: token 0 at position 0, written to
    and reading only the scratch block."""
    pad = rows - len(feeds)
    # One pass over the feeds (this runs every step for every stream, on the step's critical path).
    ids, starts, slots, lens, tables = [], [], [], [], []
    scratch = [SCRATCH_BLOCK] * n_blocks
    for f in feeds:
        s, table = f.start, f.table
        ids.append(f.ids[0])
        starts.append(s)
        slots.append(table[s // block_size] * block_size + s % block_size)
        lens.append(s + 1)
        tables.append(table[:n_blocks] if len(table) >= n_blocks else table + scratch[len(table):])
    head = [ids + [0] * pad, starts + [0] * pad, slots + [SCRATCH_BLOCK * block_size] * pad, lens + [1] * pad]
    return torch.cat([torch.tensor(head, dtype=torch.long),
                      torch.tensor(tables + [scratch] * pad, dtype=torch.long).T])


class ModelRunner:
    def __init__(self, model: Any, *, num_blocks: int, block_size: int, cuda_graphs: bool = True,
                 max_graph_batch: int = 256, max_graph_context: int = 4096, prefill_graphs: bool = False,
                 max_prefill_tokens: int = 8192, max_prefill_context: int = 16384) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        layers, kv_heads, head_dim = model_dims(model.config)
        started = time.perf_counter()
        # Never-written slots may hold anything (the pool is not zeroed: on a CPU that would make it resident);
        # attention reads only written slots, and padding reads the scratch block, zeroed here.
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        scratch = slice(SCRATCH_BLOCK * block_size, (SCRATCH_BLOCK + 1) * block_size)
        self.k_cache[:, scratch].zero_()
        self.v_cache[:, scratch].zero_()
        self.pool_bytes = 2 * self.k_cache.numel() * self.k_cache.element_size()
        pooled = time.perf_counter()
        try:
            use_paged_attention(model)
        except (ValueError, TypeError, AttributeError) as exc:  # an architecture that takes no registered attention
            raise ValueError(f"{type(model).__name__} cannot run on the engine's paged attention: {exc}") from exc
        self.fused_norms = fuse_rms_norms(model) if self.device.type == "cuda" else 0
        self.setup_parts = {"kv_pool": pooled - started, "norms": time.perf_counter() - pooled}
        self._keep_tensor_logits = True
        # Handed to the model as its "prepared" 4D mask, so transformers builds none: with no mask given it
        # inspects position_ids for packed sequences (a device-to-host sync every step, then a tokens x tokens
        # mask). Paged attention ignores it; the layout says what each request may see.
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        self._block_offsets = torch.arange(block_size, device=self.device)
        self.graphs = StepGraphs(self.device, block_size, enabled=cuda_graphs, max_batch=max_graph_batch,
                                 max_blocks=-(-max_graph_context // block_size), prefill=prefill_graphs)
        self.pad_prefills = self.graphs.prefill_enabled
        """Whether prefill steps of new prompts run padded to a graph's shape (:meth:`_padded_prefill`): on with
        prefill graphs; a test may set it on a CPU to run the path the graphs capture."""
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prefill_context = max_prefill_context

    # ------------------------------------------------------------------ one step

    def execute(self, feeds: list[Feed], decode_count: int, *, graph_prefill: bool = False) -> torch.Tensor:
        """Run ``feeds`` (the first ``decode_count`` one token each, then prefill chunks); returns the logits
        ``[rows, vocab]`` of every feed with ``sample`` set, in order. ``graph_prefill``: the prefill chunks may
        run padded, under a graph once their shape is captured (the engine's batch steps of new prompts)."""
        if decode_count == len(feeds) and decode_count > 0:
            return self._decode(feeds)
        pad = graph_prefill and self.pad_prefills
        if decode_count and (self.graphs.enabled or pad):
            # New prompts arrive all the time under load: a step that also prefills still decodes its batch with
            # a graph (one replay), and the prefill chunks run as a forward of their own.
            decoded = self._decode(feeds[:decode_count])
            rest = self._prefill(feeds[decode_count:], pad)
            return torch.cat([decoded, rest]) if rest.shape[0] else decoded
        if decode_count == 0:
            return self._prefill(feeds, pad)
        return self._mixed(feeds, decode_count)

    def _prefill(self, feeds: list[Feed], pad: bool) -> torch.Tensor:
        shape = self._prefill_shape(feeds) if pad else None
        if shape is None:
            return self._mixed(feeds, 0)
        n = sum(1 for f in feeds if f.sample)
        inputs = self._prefill_inputs(feeds, shape)
        graph = self.graphs.prefill_for(shape, self._prefill_forward)
        if graph is not None:
            return graph.replay(inputs)[:n]
        return self._prefill_forward(inputs.to(self.device, non_blocking=True), shape)[:n]

    def _prefill_shape(self, feeds: list[Feed]) -> PrefillShape | None:
        """The padded shape of a step's prefill chunks, or None (too large for a graph: run unpadded). With padded
        queries the context has at least one padding position, so they always see a key (a row with none would be
        NaN, and its keys, written to the scratch block, would reach the decodes' masked reads as 0 x NaN)."""
        tokens = sum(len(f.ids) for f in feeds)
        context = sum(f.start + len(f.ids) for f in feeds)
        rows = sum(1 for f in feeds if f.sample)
        padded = pow2_bucket(tokens)
        # Rows to a coarse ladder: fewer shapes to capture; a few more rows through the LM head cost nothing.
        shape = (padded, pow2_bucket(context + (padded > tokens)), pow2_bucket(rows, 8))
        if shape[0] > self.max_prefill_tokens or shape[1] > self.max_prefill_context:
            return None
        return shape

    def _prefill_inputs(self, feeds: list[Feed], shape: PrefillShape) -> torch.Tensor:
        """A padded prefill step's inputs as one host tensor (:func:`~sllm_actors.gpu.cuda_graphs.prefill_input_size`
        says the layout). Padding: token 0 at position 0 in segment -1 with its keys in the scratch slot; padded
        context positions are that slot at position 0 in segment -1 (only padded queries see them); padded rows
        sample row 0."""
        n_tokens, n_context, n_rows = shape
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_seg: list[int] = []
        ctx_slots: list[int] = []
        k_seg: list[int] = []
        k_pos: list[int] = []
        rows: list[int] = []
        for index, feed in enumerate(feeds):
            start, n, table = feed.start, len(feed.ids), feed.table
            context = start + n
            own = [b * bs + o for b in table[:-(-context // bs)] for o in range(bs)][:context]
            ids += feed.ids
            positions += range(start, context)
            slots += own[start:]
            q_seg += [index] * n
            ctx_slots += own
            k_seg += [index] * context
            k_pos += range(context)
            if feed.sample:
                rows.append(len(ids) - 1)
        scratch = SCRATCH_BLOCK * bs
        pad_q, pad_k = n_tokens - len(ids), n_context - len(ctx_slots)
        return torch.tensor(ids + [0] * pad_q + positions + [0] * pad_q + slots + [scratch] * pad_q
                            + q_seg + [-1] * pad_q + ctx_slots + [scratch] * pad_k + k_seg + [-1] * pad_k
                            + k_pos + [0] * pad_k + rows + [0] * (n_rows - len(rows)), dtype=torch.long)

    def _prefill_forward(self, inputs: torch.Tensor, shape: PrefillShape) -> torch.Tensor:
        """A padded prefill step on the device (what a prefill graph captures): every chunk's queries see their
        own request's context up to their own positions, one attention call per layer."""
        n_tokens, n_context, _ = shape
        ids, positions, slots, q_seg = inputs[:4 * n_tokens].view(4, n_tokens)
        ctx_slots, k_seg, k_pos = inputs[4 * n_tokens:4 * n_tokens + 3 * n_context].view(3, n_context)
        rows = inputs[4 * n_tokens + 3 * n_context:]
        mask = (q_seg[:, None] == k_seg[None, :]) & (k_pos[None, :] <= positions[:, None])
        layout = StepLayout(self.k_cache, self.v_cache, slots,
                            prefills=[PrefillSegment(0, n_tokens, ctx_slots, mask)])
        return self._run(ids, positions, layout, rows)

    def _mixed(self, feeds: list[Feed], decode_count: int) -> torch.Tensor:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for feed in feeds:
            for offset, token in enumerate(feed.ids):
                pos = feed.start + offset
                ids.append(token)
                positions.append(pos)
                slots.append(_slot(feed.table, pos, bs))
            if feed.sample:
                sample_rows.append(len(ids) - 1)
        layout = StepLayout(self.k_cache, self.v_cache, self._tensor(slots))
        if len(feeds) > decode_count:
            # Decodes come first, one token each: the prefill tokens start at row decode_count.
            layout.prefills = [self._prefill_segment(feeds[decode_count:], decode_count)]
        if decode_count:
            layout.n_decode = decode_count
            layout.decode_slots, layout.decode_mask = self._decode_context(
                self._tensor(_padded_tables(feeds[:decode_count], self._blocks_bucket(feeds[:decode_count]))),
                self._tensor([f.start + 1 for f in feeds[:decode_count]]),
            )
        return self._run(self._tensor(ids), self._tensor(positions), layout, self._tensor(sample_rows))

    def _prefill_segment(self, feeds: list[Feed], first: int) -> PrefillSegment:
        """All of a step's prefill chunks as one attention call: each chunk's queries see its own request's
        context up to their own positions (a block-diagonal causal mask), so a step of 30 prompts costs one
        kernel per layer, not 30."""
        length = sum(len(f.ids) for f in feeds)
        if len(feeds) == 1 and feeds[0].start == 0:
            return PrefillSegment(first, length, self.context_slots(feeds[0].table, length), None)
        ctx_slots = torch.cat([self.context_slots(f.table, f.start + len(f.ids)) for f in feeds])
        q_seg, q_pos, k_seg, k_pos = [], [], [], []
        for index, feed in enumerate(feeds):
            context = feed.start + len(feed.ids)
            q_seg += [index] * len(feed.ids)
            q_pos += range(feed.start, context)
            k_seg += [index] * context
            k_pos += range(context)
        q_seg_t, q_pos_t, k_seg_t, k_pos_t = (self._tensor(v) for v in (q_seg, q_pos, k_seg, k_pos))
        mask = (q_seg_t[:, None] == k_seg_t[None, :]) & (k_pos_t[None, :] <= q_pos_t[:, None])
        return PrefillSegment(first, length, ctx_slots, mask)

    def _decode(self, feeds: list[Feed]) -> torch.Tensor:
        n = len(feeds)
        n_blocks = self._blocks_bucket(feeds)
        graph = self.graphs.for_shape(batch_bucket(n), n_blocks, self._decode_forward)
        if graph is not None:
            return graph.replay(decode_inputs(feeds, graph.batch, n_blocks, self.block_size))[:n]
        inputs = decode_inputs(feeds, len(feeds), n_blocks, self.block_size).to(self.device, non_blocking=True)
        ids, positions, slots, lens = inputs[:4]
        tables = inputs[4:].T
        return self._decode_forward(ids, positions, slots, tables, lens)

    def _decode_forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                        tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        layout = StepLayout(self.k_cache, self.v_cache, slots, n_decode=ids.shape[0])
        layout.decode_slots, layout.decode_mask = self._decode_context(tables, lens)
        return self._run(ids, positions, layout, None)

    def _decode_context(self, tables: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots and mask of every decode's context. Positions past a request's length read the scratch slot, so
        no never-written slot is ever read (0 × NaN would poison the softmax's sum)."""
        n, blocks = tables.shape
        slots = (tables[:, :, None] * self.block_size + self._block_offsets).reshape(n, blocks * self.block_size)
        visible = torch.arange(blocks * self.block_size, device=self.device)[None, :] < lens[:, None]
        slots = torch.where(visible, slots, SCRATCH_BLOCK * self.block_size)
        # Additive, in the model's dtype, made once a step: a boolean mask is converted inside SDPA in every layer.
        bias = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
        return slots, bias[:, None, None, :]

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, layout: StepLayout,
             sample_rows: torch.Tensor | None) -> torch.Tensor:
        set_layout(layout)
        try:
            with torch.inference_mode():
                common = dict(input_ids=ids[None], position_ids=positions[None], attention_mask=self._no_mask,
                              use_cache=False)
                if sample_rows is None:
                    return self.model(**common).logits[0]
                if self._keep_tensor_logits:
                    try:
                        # Logits only where a token is sampled: a long prefill otherwise spends much of its
                        # time and memory on the LM head over every position.
                        out = self.model(**common, logits_to_keep=sample_rows)
                        return out.logits[0]
                    except TypeError:
                        self._keep_tensor_logits = False  # an architecture without logits_to_keep
                out = self.model(**common)
                return out.logits[0, sample_rows]
        finally:
            set_layout(None)

    # ------------------------------------------------------------------ shapes and tensors

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def context_slots(self, table: list[int], context: int) -> torch.Tensor:
        """The cache slots of a request's first ``context`` tokens, in order, from its block table (on the
        device): where a prefill reads its context, and where a KV copy gathers or scatters a request's cache."""
        blocks = self._tensor(table[: -(-context // self.block_size)])
        return (blocks[:, None] * self.block_size + self._block_offsets).reshape(-1)[:context]

    def _blocks_bucket(self, feeds: list[Feed]) -> int:
        """Context length of the step in blocks, rounded up to a power of two: few shapes, so few graphs, and
        eager and graph steps compute on the same shapes."""
        need = max(-(-(f.start + 1) // self.block_size) for f in feeds)
        bucket = 1
        while bucket < need:
            bucket *= 2
        return bucket

    @property
    def graph_shapes(self) -> list[tuple[int, int]]:
        """The decode shapes captured so far (padded batch, context blocks)."""
        return self.graphs.shapes

    @property
    def prefill_graph_shapes(self) -> list[PrefillShape]:
        """The prefill shapes captured so far (tokens, context, sampled rows)."""
        return self.graphs.prefill_shapes


__all__ = ["Feed", "ModelRunner", "kv_bytes_per_token", "model_dims"]
