"""A request's text, one token at a time: the engine's detokenizer.

Text is streamed as deltas while the ids grow, and a character whose bytes span several tokens comes out whole,
with the token that completes it. A request resumed from its token log (a migration, a restart) gets a detokenizer
built from the ids it has, and its text goes on exactly as it would have.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Text deltas from a growing id list: tokenizers' own streaming decoder (``DecodeStream``), which holds
    back bytes of a character split across tokens. Falls back to decoding a short window for tokenizers
    without a fast backend.

    A request resumed from its log (a migration, a restart) may have stopped mid-character: the ids of that
    unfinished character were never turned into text, so they are fed again here, and their character comes out
    with the token that completes it, as it would have without the resume.
    """

    def __init__(self, tokenizer: Any, ids: list[int]) -> None:
        self.tokenizer = tokenizer
        ids = list(ids)
        unfinished = 0
        while unfinished < min(4, len(ids)) and tokenizer.decode(
                ids[max(0, len(ids) - unfinished - 8):len(ids) - unfinished], skip_special_tokens=True
        ).endswith("\ufffd"):
            unfinished += 1
        done, again = ids[:len(ids) - unfinished], ids[len(ids) - unfinished:]
        self._pending = ""
        self._stream = None
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._stream = DecodeStream(done[-8:], skip_special_tokens=True) if done else \
                    DecodeStream(skip_special_tokens=True)
                self._backend = backend
            except (ImportError, TypeError):
                self._stream = None
        self.ids = done
        self.prefix_offset = max(0, len(self.ids) - 6)
        self.read_offset = len(self.ids)
        self._pending = "".join(self.push(token) for token in again)

    def push(self, token_id: int) -> str:
        pending, self._pending = self._pending, ""
        if self._stream is not None:
            return pending + (self._stream.step(self._backend, token_id) or "")
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return pending + delta
        return pending


__all__ = ["IncrementalDetokenizer"]
