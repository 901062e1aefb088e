"""Tiny random-weight models with a locally trained tokenizer, for tests and benchmarks.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in milliseconds on an
embedded text, and the weights come from a seeded random init of a transformers config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["make_tiny_model", "make_tokenizer"]

_CORPUS = """
The capital of France is Paris. The capital of Italy is Rome. Serverless inference starts models
on demand and loads checkpoints from the fastest tier that holds them. A request streams tokens to
its client; when a server is needed for another model, the running inference migrates by sending
its tokens, and the destination recomputes the key-value cache. Actors exchange messages over
queues and a supervisor restarts a crashed actor. Hello world, how are you today? Once upon a time
there was a small model that answered every question with a story about numbers 0 1 2 3 4 5 6 7 8 9.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 384) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    dest: str | Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    dtype: str = "float32",
    intermediate_size: int | None = None,
) -> Path:
    """Write a tiny random-weight causal LM with tokenizer to ``dest`` (a Hugging Face directory)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    if arch == "llama":
        config: Any = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or hidden_size * 3,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden_size, n_layer=layers, n_head=4, n_positions=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        )
    elif arch == "opt":
        config = OPTConfig(
            vocab_size=vocab, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4,
            ffn_dim=hidden_size * 4, word_embed_proj_dim=hidden_size, max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (llama, gpt2 or opt)")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        # A wider init than the default makes greedy continuations varied instead of one repeated token.
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
