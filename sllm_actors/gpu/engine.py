"""Token-by-token generation with a KV cache, resumable from a token log.

A request's whole state is its token log (prompt ids + generated ids) and its sampling parameters:
the KV cache is derived (a prefill over the log rebuilds it), and the random choice at step ``k`` is
a function of ``(seed, k)`` alone. That is what lets a request continue on another instance, after a
migration or a crash, exactly as it would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    """The generator seed of one sampling step: independent of where or when the step runs."""
    return ((seed * 6364136223846793005) ^ ((step + 1) * _MIX)) & _MASK


def choose_token(logits: torch.Tensor, temperature: float, top_p: float, seed: int, step: int) -> int:
    """Greedy when temperature is 0, else seeded nucleus sampling on the CPU (same on any device)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = cumulative - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    generator = torch.Generator().manual_seed(step_seed(seed, step))
    return int(torch.multinomial(probs, 1, generator=generator).item())


class IncrementalDetokenizer:
    """Text deltas from a growing id list without re-decoding everything each step.

    Holds back a delta while it ends in an incomplete UTF-8 sequence (U+FFFD), as byte-level BPE
    splits characters across tokens.
    """

    def __init__(self, tokenizer: Any, ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(ids)
        self.prefix_offset = max(0, len(self.ids) - 6)
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""


@dataclass
class Sequence:
    """One request's decoding state on one instance."""

    request_id: str
    prompt_ids: list[int]
    generated_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    text: str = ""
    cache: Any = None
    pending_input: int | None = None
    """The last generated token, not yet fed through the model (its KV is not in the cache)."""
    next_logits: torch.Tensor | None = None
    """Logits for the next token when the prefill already produced them (a fresh prompt)."""
    detok: IncrementalDetokenizer | None = None
    finish_reason: str = ""
    started_at: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated_ids


class Engine:
    """Runs sequences of one model on one device."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        eos: set[int] = set()
        for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list):
                eos.update(source)
        self.eos_ids = eos
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30) or (1 << 30))

    def tokenize(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this model has no chat template; send the prompt without chat")
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if not isinstance(ids, list):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(prompt)["input_ids"]]

    def prefill(self, seq: Sequence, from_cache: bool = False) -> float:
        """Build the KV cache for every token of the log but the last generated one.

        When ``generated_ids`` is empty the whole prompt goes through and the next token is chosen;
        otherwise the last generated token waits in ``pending_input`` so the next step feeds it,
        exactly as an undisturbed run would. Returns seconds spent.
        """
        started = time.perf_counter()
        from transformers import DynamicCache

        tokens = seq.tokens
        if seq.generated_ids:
            context, seq.pending_input = tokens[:-1], tokens[-1]
        else:
            context, seq.pending_input = tokens, None
        seq.cache = DynamicCache()
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.generated_ids)
        logits = self._forward(context, seq.cache)
        seq.next_logits = logits if seq.pending_input is None else None
        return time.perf_counter() - started

    def extend(self, seq: Sequence, new_ids: list[int]) -> float:
        """Feed more tokens of the log into an existing cache (a later migration round)."""
        started = time.perf_counter()
        if not new_ids:
            return 0.0
        feed = ([seq.pending_input] if seq.pending_input is not None else []) + new_ids[:-1]
        if feed:
            self._forward(feed, seq.cache)
        seq.pending_input = new_ids[-1]
        seq.next_logits = None
        seq.generated_ids.extend(new_ids)
        assert seq.detok is not None
        for token in new_ids:
            seq.text += seq.detok.push(token)
        return time.perf_counter() - started

    def step(self, seq: Sequence) -> tuple[int, str]:
        """Produce one token; returns (token id, text delta). Sets finish_reason when done."""
        if seq.next_logits is not None:
            logits, seq.next_logits = seq.next_logits, None
        else:
            assert seq.pending_input is not None
            logits = self._forward([seq.pending_input], seq.cache)
        step_index = len(seq.generated_ids)
        token = choose_token(logits, seq.temperature, seq.top_p, seq.seed, step_index)
        seq.generated_ids.append(token)
        seq.pending_input = token
        assert seq.detok is not None
        delta = seq.detok.push(token)
        if token in self.eos_ids:
            seq.finish_reason = "eos"
            return token, ""
        if seq.stop and delta:
            combined = seq.text + delta
            cut = min((i for i in (combined.find(s, max(0, len(seq.text) - len(s))) for s in seq.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                delta = combined[:cut][len(seq.text):]
                seq.text = combined[:cut]
                seq.finish_reason = "stop"
                return token, delta
        seq.text += delta
        if len(seq.generated_ids) >= seq.max_tokens:
            seq.finish_reason = "length"
        elif len(seq.tokens) >= self.max_positions:
            seq.finish_reason = "context"
        return token, delta

    def _forward(self, ids: list[int], cache: Any) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -1, :].float()
