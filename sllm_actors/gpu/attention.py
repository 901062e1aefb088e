"""Attention for multi-token forwards against a long KV cache without copying the cache.

A live migration's hand-over feeds the destination the last few tokens in one forward (its
catch-up and its first decode step at once). With a cache, such a forward carries an attention mask,
and transformers' SDPA path then expands grouped-query keys and values to every query head
(``repeat_kv``): a copy of the whole cache per layer, which at 4k tokens of context made a 3-token
forward cost 2.2 single-token steps on a CPU and the migration's pause miss its 2-step goal.

Here the query heads that share a key/value head are folded into the query-length axis instead (what
transformers does itself for a single query token, ``pack_gqa``), and the mask is tiled to match: the
same attention, computed on the cache as it is. Everything else goes to transformers' own SDPA.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

NAME = "sllm_sdpa"
DISABLE_ENV = "SLLM_PACKED_GQA"
"""``SLLM_PACKED_GQA=0`` keeps transformers' own SDPA: the baseline of ``benchmarks/bench_migration.py``."""
_registered = False


def packed_gqa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    batch, heads, q_len, dim = query.shape
    if (groups == 1 or q_len == 1 or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or key.shape[1] * groups != heads):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Query head h = kv * groups + r; row r * q_len + i of the folded query is head r's position i.
    folded = query.reshape(batch, heads // groups, groups * q_len, dim)
    mask = attention_mask.repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def use_packed_gqa(model: Any) -> bool:
    """Switch a model that runs transformers' SDPA attention to :func:`packed_gqa_attention`. Returns
    whether it did; a model on another implementation, or a transformers without the interfaces, keeps its
    own."""
    global _registered
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        if not _registered:
            AttentionInterface.register(NAME, packed_gqa_attention)
            AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as SDPA
            _registered = True
        model.set_attn_implementation(NAME)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        log.info("keeping transformers' SDPA attention: %s", exc)
        return False
    return True


__all__ = ["NAME", "packed_gqa_attention", "use_packed_gqa"]
