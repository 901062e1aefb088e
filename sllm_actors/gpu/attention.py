"""Attention over the paged KV cache, plugged into transformers' own model code.

transformers lets a model's attention modules call a registered function (its attention-function registry)
with the step's queries, keys and values after rotary embeddings. The model runs without a cache object of its
own (``use_cache=False``); this function writes the step's keys and values into the pool's slots and attends
over each request's blocks. So Llama, Qwen2, Mistral and the other GQA decoders transformers ships run paged
without a line of their code rewritten.

A step's tokens are packed into one row (``[1, tokens]``): first one decode token per running request, then
the prefill chunks. Decodes attend all at once over their gathered blocks (padded to a bucket, masked); the
prefill chunks attend together in one call over their requests' gathered contexts, under a block-diagonal
causal mask. Grouped-query heads are folded into the query axis (no copy of the cache per query head, and
SDPA's memory-efficient kernel takes the mask); a lone fresh prompt uses plain causal SDPA.

The step's layout (slots, block tables, lengths) is set by the runner in a thread-local :class:`StepLayout`
before the forward: the registry passes the function only what the model has, and one engine per thread
(one instance actor) reads its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

NAME = "sllm_paged"


@dataclass
class PrefillSegment:
    start: int
    """First position of this chunk in the packed step."""
    length: int
    slots: torch.Tensor
    """[context] cache slots of the request's whole context, this chunk included."""
    mask: torch.Tensor | None
    """[length, context] bool (True: attend); None when the chunk is the whole context (plain causal)."""


@dataclass
class StepLayout:
    k_cache: torch.Tensor
    """[layers, slots, kv_heads, head_dim]"""
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    """[tokens] where each token's keys and values go."""
    n_decode: int = 0
    decode_slots: torch.Tensor | None = None
    """[decodes, context] slots each decode attends to (padded with the scratch block)."""
    decode_mask: torch.Tensor | None = None
    """[decodes, 1, 1, context] additive (0 where visible, -inf elsewhere)."""
    prefills: list[PrefillSegment] = field(default_factory=list)


_current = threading.local()


def set_layout(layout: StepLayout | None) -> None:
    _current.layout = layout


def paged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query ``[1, heads, tokens, dim]``, key/value ``[1, kv_heads, tokens, dim]`` → ``[1, tokens, heads, dim]``."""
    layout = getattr(_current, "layout", None)
    if layout is None:
        # The model used outside an engine step (``generate``, a reference forward): transformers' own SDPA,
        # with the masks transformers builds for it.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("paged attention does not implement soft-capping or position bias")
    layer = int(module.layer_idx)
    k_cache, v_cache = layout.k_cache[layer], layout.v_cache[layer]
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    k_cache.index_copy_(0, layout.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, layout.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))
    q = query[0]  # [heads, tokens, dim]
    parts: list[torch.Tensor] = []
    n = layout.n_decode
    if n:
        assert layout.decode_slots is not None and layout.decode_mask is not None
        # Head h = kv * groups + r: fold the group into the query axis, one query row per group member.
        folded = q[:, :n, :].transpose(0, 1).reshape(n, kv_heads, groups, dim)
        keys = k_cache[layout.decode_slots].transpose(1, 2)  # [n, kv_heads, context, dim]
        values = v_cache[layout.decode_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=layout.decode_mask, scale=scaling)
        parts.append(out.reshape(n, heads, dim))
    for seg in layout.prefills:
        chunk = q[:, seg.start:seg.start + seg.length, :]  # [heads, length, dim]
        keys = k_cache[seg.slots].transpose(0, 1)  # [kv_heads, context, dim]
        values = v_cache[seg.slots].transpose(0, 1)
        if seg.mask is None:
            out = F.scaled_dot_product_attention(chunk[None], keys[None], values[None], is_causal=True,
                                                 scale=scaling, enable_gqa=groups > 1)[0]
        else:
            # Grouped heads folded into the query axis (row r * length + i is group member r's token i), so the
            # memory-efficient kernel runs with the mask; SDPA's own GQA would fall back to the math kernel.
            folded = chunk.reshape(kv_heads, groups * seg.length, dim)
            mask = seg.mask.repeat(groups, 1) if groups > 1 else seg.mask
            out = F.scaled_dot_product_attention(folded[None], keys[None], values[None], attn_mask=mask[None, None],
                                                 scale=scaling)[0].reshape(heads, seg.length, dim)
        parts.append(out.transpose(0, 1))  # [length, heads, dim]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if out.shape[0] != tokens:
        raise RuntimeError(f"paged attention covered {out.shape[0]} of the step's {tokens} tokens")
    return out[None], None


_registered = False


def use_paged_attention(model: Any) -> None:
    """Point ``model``'s attention modules at :func:`paged_attention`. Its masks are SDPA's: for an engine step
    (one packed row, no padding, no cache object) transformers skips building one, and the layout carries what
    each request may see; outside a step the model works as with SDPA."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not _registered:
        AttentionInterface.register(NAME, paged_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    model.set_attn_implementation(NAME)


__all__ = ["NAME", "PrefillSegment", "StepLayout", "paged_attention", "set_layout",
           "use_paged_attention"]
