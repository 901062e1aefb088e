"""Tiny random-weight causal LMs for tests (no model hub): Llama with GQA, GPT-2 and OPT (tied
embeddings). Also usable by other test suites that need a model directory quickly."""

from __future__ import annotations

from typing import Any, Literal

import torch

__all__ = ["MODEL_KINDS", "greedy", "tiny_config", "tiny_model"]

ModelKind = Literal["llama", "gpt2", "opt"]
MODEL_KINDS: tuple[ModelKind, ...] = ("llama", "gpt2", "opt")
TINY_VOCAB = 320


def tiny_config(kind: ModelKind, vocab_size: int = TINY_VOCAB) -> Any:
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if kind == "llama":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab_size,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **special,
        )
    if kind == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=128, **special)
    if kind == "opt":
        return OPTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=160,
            num_attention_heads=4,
            vocab_size=vocab_size,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
            **special,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}")


def tiny_model(kind: ModelKind, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A randomly initialised tiny model in eval mode (deterministic for a given seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(kind)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves biases and norms at 0/1; perturb every floating tensor so a loader that
    # silently keeps an initial value would be caught.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p, dtype=torch.float32).to(p.dtype) * 0.02)
    return model.eval()


def greedy(model: Any, input_ids: torch.Tensor, new_tokens: int = 10) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, pad_token_id=0
        )
