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

from sllm_actors.gpu.attention import use_packed_gqa

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


def cache_kwarg(model: Any) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` from transformers 5.x on, where
    ``past_key_values`` is deprecated (a warning on every call, removal announced), else the old name."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


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
        self._keep_last = True
        self._cache_kwarg = cache_kwarg(model)
        use_packed_gqa(model)

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

    def prefill(self, seq: Sequence) -> float:
        """Build the KV cache for every token of the log and keep the logits of the last one.

        The next ``step`` samples from those logits without a forward of its own, so a resumed
        request (after a migration or a crash) produces its next token as soon as the prefill ends.
        Returns seconds spent.
        """
        started = time.perf_counter()
        from transformers import DynamicCache

        seq.cache = DynamicCache()
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.generated_ids)
        seq.pending_input = None
        seq.next_logits = self._forward(seq.tokens, seq.cache)
        self._settle()
        return time.perf_counter() - started

    def extend(self, seq: Sequence, new_ids: list[int]) -> float:
        """Feed more tokens of the log into an existing cache (a migration round, the catch-up).

        Every new token goes through in one forward and the last logits are kept: the catch-up and
        the first decode step after it are one forward pass, not two.
        """
        started = time.perf_counter()
        if not new_ids:
            return 0.0
        feed = ([seq.pending_input] if seq.pending_input is not None else []) + list(new_ids)
        seq.next_logits = self._forward(feed, seq.cache)
        self._settle()
        seq.pending_input = None
        seq.generated_ids.extend(new_ids)
        assert seq.detok is not None
        for token in new_ids:
            seq.text += seq.detok.push(token)
        return time.perf_counter() - started

    # ------------------------------------------------------------------ KV cache copy (live migration)

    def export_cache(self, seq: Sequence) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(tokens the cache covers, [(keys, values)] per layer). The tensors are the cache's own, not
        copies; they stay as they are while decoding goes on, since a DynamicCache step concatenates into new
        tensors rather than writing into these (a KV copy reads them over several steps)."""
        cache = seq.cache
        if cache is None or not getattr(cache, "layers", None):
            raise ValueError(f"{seq.request_id} has no KV cache to export")
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        if any(k is None or v is None for k, v in layers):
            raise ValueError(f"{seq.request_id}: the KV cache has an uninitialised layer")
        return int(cache.get_seq_length()), layers

    def import_cache(self, seq: Sequence, n_cached: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Continue ``seq`` from a KV cache copied from another instance (any device, any float dtype).

        The cache holds the first ``n_cached`` tokens of the log; the rest (at least the last token,
        for its logits) are fed here, so the sequence ends as after a ``prefill``. Returns seconds.
        """
        from transformers import DynamicCache

        started = time.perf_counter()
        tokens = seq.tokens
        n_layers = int(getattr(self.model.config, "num_hidden_layers", len(layers)))
        if len(layers) != n_layers:
            raise ValueError(f"the copied cache has {len(layers)} layers, the model {n_layers}")
        if not 0 < n_cached <= len(tokens):
            raise ValueError(f"the copied cache covers {n_cached} tokens of a log of {len(tokens)}")
        dtype = next(self.model.parameters()).dtype
        # The last token goes through the model again here, for the next token's logits.
        keep = min(n_cached, len(tokens) - 1)
        cache = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            if keys.dim() != 4 or keys.shape != values.shape or keys.shape[-2] != n_cached:
                raise ValueError(f"layer {index}: {tuple(keys.shape)} / {tuple(values.shape)} do not hold "
                                 f"{n_cached} positions")
            cache.update(keys[..., :keep, :].to(self.device, dtype), values[..., :keep, :].to(self.device, dtype),
                         index)
        n_cached = keep
        seq.cache = cache
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.generated_ids)
        seq.pending_input = None
        seq.next_logits = self._forward(tokens[n_cached:], cache)
        self._settle()
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

    def _settle(self) -> None:
        """Wait until the device has run what was queued. CUDA kernels run asynchronously: without this a
        migration round reported its cache rebuilt while a 4k-token prefill was still queued, and the
        hand-over forward queued behind it waited for the rest (96 ms against a 26 ms step on an H200);
        the recompute-time fits learned from such rounds measured the queueing, not the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward(self, ids: list[int], cache: Any) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        with torch.inference_mode():
            if self._keep_last:
                try:
                    # Only the last position's logits: a prefill of 4k tokens otherwise spends much of
                    # its time (and ~800 MB) on the LM head over every position.
                    out = self.model(input_ids=input_ids, logits_to_keep=1, **kwargs)
                    return out.logits[0, -1, :].float()
                except TypeError:
                    self._keep_last = False  # an architecture without logits_to_keep
            out = self.model(input_ids=input_ids, **kwargs)
        return out.logits[0, -1, :].float()
