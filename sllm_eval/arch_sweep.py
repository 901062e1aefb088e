"""Every causal-LM architecture transformers ships, built from a tiny config, through our store:
``save_pretrained`` -> ``convert`` -> ``load_model``, against what transformers itself loads.

The config shrinking is generic (size attributes set wherever a config, or one of its sub-configs, has
them), not a table per architecture: an architecture whose tiny config cannot be built, or whose own
model cannot run on a CPU, is reported as skipped with the reason, never silently dropped.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Skip", "causal_lm_architectures", "sweep_one", "tiny_model"]

log = logging.getLogger(__name__)

TINY = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "n_embed": 64, "embed_dim": 64, "emb_size": 64,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "attention_head_dim": 16, "kv_channels": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16,
    "intermediate_size": 96, "ffn_dim": 96, "n_inner": 96, "d_ff": 96, "decoder_ffn_dim": 96,
    "encoder_ffn_dim": 96, "ffn_hidden_size": 96,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_routed_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "num_shared_experts": 1,
    "vocab_size": 256,
    "rotary_dim": 8, "rotary_emb_base": 10000,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_seq_len": 256, "seq_length": 256,
}
"""Small values for the size attributes configs use; only attributes a config already has are set."""

MAX_PARAMETERS = 20_000_000
"""A "tiny" model bigger than this kept a size we do not know the name of: skipped (CI time)."""


@dataclass
class Outcome:
    model_type: str
    class_name: str
    skipped: str = ""
    """Why this architecture was not swept (empty: it was)."""


def causal_lm_architectures() -> list[tuple[str, str]]:
    """(model_type, class name) of every causal LM in transformers' auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")


def _shrink(config: Any, depth: int = 0) -> None:
    layers = next((getattr(config, k) for k in LAYER_COUNTS if isinstance(getattr(config, k, None), int)), None)
    per_layer = {k: v for k, v in vars(config).items()
                 if layers and isinstance(v, list) and len(v) == layers and layers > 2}
    for key, value in TINY.items():
        if hasattr(config, key) and isinstance(getattr(config, key, None), int) and not isinstance(
                getattr(config, key), bool):
            try:
                setattr(config, key, value)
            except (AttributeError, ValueError, TypeError):
                pass
    if per_layer:
        # Per-layer lists (attention kinds, MoE or dense MLP, mamba or attention): keep one layer of each
        # kind the architecture mixes (up to 4), at least 2, and every list in step with the count.
        keep: list[int] = []
        for values in per_layer.values():
            seen: set[str] = set()
            for i, v in enumerate(values):
                if repr(v) not in seen:
                    seen.add(repr(v))
                    if i not in keep:
                        keep.append(i)
        keep = sorted(keep)[:4]
        keep = sorted(set(keep) | {0, 1}) if len(keep) < 2 else keep
        for k in LAYER_COUNTS:
            if isinstance(getattr(config, k, None), int):
                try:
                    setattr(config, k, len(keep))
                except (AttributeError, ValueError, TypeError):
                    pass
        for name, values in per_layer.items():
            try:
                setattr(config, name, [values[i] for i in keep])
            except (AttributeError, ValueError, TypeError):
                pass
    if isinstance(getattr(config, "qk_rope_head_dim", None), int) and hasattr(config, "head_dim"):
        try:  # multi-head latent attention: its rotary part is what ``head_dim`` sizes
            config.head_dim = config.qk_rope_head_dim
        except (AttributeError, ValueError, TypeError):
            pass
    if depth < 2:
        for name in ("text_config", "decoder", "decoder_config", "language_config", "llm_config"):
            sub = getattr(config, name, None)
            if sub is not None and hasattr(sub, "to_dict"):
                _shrink(sub, depth + 1)


def tiny_model(model_type: str, class_name: str, seed: int = 0) -> Any:
    """A random-weight model of the architecture from a shrunk default config (raises if it cannot be built)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    _shrink(config)
    for token in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, token, None)
        if isinstance(value, int) and value >= 256:
            setattr(config, token, {"pad_token_id": 0, "bos_token_id": 1}.get(token, 2))
    cls = getattr(transformers, class_name)
    with torch.device("meta"):  # counted before any memory is spent on it
        n = sum(p.numel() for p in cls(copy.deepcopy(config)).parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(f"the shrunk config still has {n / 1e6:.0f}M parameters (a size attribute we do not know)")
    torch.manual_seed(seed)
    model = cls(copy.deepcopy(config))
    with torch.no_grad():
        # Random but not default-init: a weight the loader dropped or left at its init would show.
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def greedy(model: Any, steps: int = 3) -> list[int]:
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             do_sample=False, pad_token_id=0)
    return out[0].tolist()


def tied_names(model: Any) -> set[frozenset[str]]:
    """Groups of state-dict names that share storage."""
    groups: dict[tuple[int, int], set[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), set()).add(name)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


class Skip(Exception):
    """This architecture cannot be swept here; the message says why."""


def sweep_one(model_type: str, class_name: str, workdir: Path) -> dict[str, Any]:
    """Run one architecture through the store; raises Skip (with the reason) or AssertionError (a real
    failure of ours); returns what was compared."""
    import transformers

    from sllm_actors.storage import convert, load_model

    if not isinstance(getattr(transformers, class_name, None), type):
        raise Skip(f"{class_name} is not importable here")
    try:
        source_model = tiny_model(model_type, class_name)
    except Exception as exc:  # noqa: BLE001 - any failure to build transformers' own model is a skip, reported
        raise Skip(f"no tiny config builds: {type(exc).__name__}: {str(exc)[:160]}") from None
    src = workdir / "hf"
    try:
        source_model.save_pretrained(src)
        reference = type(source_model).from_pretrained(src, dtype="auto")
        reference_tokens = greedy(reference)
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"transformers' own save/load/generate fails on CPU: {type(exc).__name__}: "
                   f"{str(exc)[:160]}") from None
    dest = workdir / "ours"
    convert(str(src), str(dest))
    ours = load_model(dest, "cpu")
    ref_sd, our_sd = reference.state_dict(), ours.state_dict()
    assert set(our_sd) == set(ref_sd), (sorted(set(ref_sd) ^ set(our_sd))[:10])
    differ = [k for k in ref_sd if not (ref_sd[k].dtype == our_sd[k].dtype and ref_sd[k].shape == our_sd[k].shape
                                        and torch.equal(ref_sd[k], our_sd[k]))]
    assert not differ, f"tensors differ from what transformers loads: {differ[:10]}"
    assert tied_names(ours) == tied_names(reference), (tied_names(ours), tied_names(reference))
    tokens = greedy(ours)
    assert tokens == reference_tokens, (tokens, reference_tokens)
    return {"tensors": len(ref_sd), "tied": len(tied_names(reference)), "tokens": tokens}
