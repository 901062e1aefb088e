"""A request's state on one instance: its token log, its sampling parameters, where its KV cache is.

The token log (prompt ids + generated ids) and the :class:`~sllm_actors.messages.SamplingParams` (the same
record the messages carry) are the whole request: the KV cache
(``block_table``, ``num_cached``) is derived from the log, and the text from the generated ids. The scheduler
decides over these records, the engine advances them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sllm_actors.gpu.detokenizer import IncrementalDetokenizer
from sllm_actors.messages import SamplingParams


@dataclass(eq=False)
class Sequence:
    """One request's decoding state on one instance. Compared by identity: it is mutable state (a batch finds and
    removes its own object, never a look-alike)."""

    request_id: str
    prompt_ids: list[int]
    generated_ids: list[int]
    sampling: SamplingParams
    text: str = ""
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    """Tokens of the log whose keys and values are in the cache. A decoding request has all but its last."""
    cache_salt: str = ""
    """Requests share cached prefix blocks only under the same salt (a tenant's): see the block manager."""
    block_hashes: list[int] = field(default_factory=list)
    """The prefix-cache hash of each leading full, computed block of ``block_table`` (prefix caching only)."""
    next_logits: torch.Tensor | None = None
    """Logits for the next token when a forward outside the batch already made them (a migration's catch-up)."""
    detok: IncrementalDetokenizer | None = None
    finish_reason: str = ""
    preemptions: int = 0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated_ids

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated_ids)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.generated_ids[position - n]


__all__ = ["Sequence"]
