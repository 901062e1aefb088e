"""Rendering a conversation into one prompt, for chats the cluster's ``chat`` flag cannot express.

A request with a single user message goes to the cluster as ``chat=True`` with that message: the instance
applies the model's template, exactly as ``sllm generate --chat`` does. A conversation (a system message,
several turns) is rendered here with the model's own tokenizer and template and sent as a plain prompt.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from sllm_actors.http.openai_api import ApiError, bad
from sllm_actors.runtime.topology import DEFAULT_MODEL_SOURCE

__all__ = ["ChatTemplates"]


def tokenizer_dir(source: str) -> tuple[Path, dict[str, Any]] | None:
    if source == DEFAULT_MODEL_SOURCE:
        from sllm_actors.models import default_model_dir

        return default_model_dir(), {}
    path = Path(source)
    if path.is_dir():
        return path, {}
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    return None


class ChatTemplates:
    def __init__(self) -> None:
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _load(self, model: str, source: str) -> Any:
        with self._lock:
            tok = self._tokenizers.get(source)
            if tok is None:
                where = tokenizer_dir(source)
                if where is None:
                    raise ApiError(400, f"model {model!r} comes from {source!r}, whose tokenizer this server cannot "
                                   "read; send a single user message instead", param="messages",
                                   code="unsupported_conversation")
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(where[0]), **where[1])
                self._tokenizers[source] = tok
            return tok

    def _render(self, model: str, source: str, messages: list[dict[str, str]]) -> str:
        tok = self._load(model, source)
        if not getattr(tok, "chat_template", None):
            raise bad("messages", f"model {model!r} has no chat template; use /v1/completions")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template that raises on this conversation (e.g. roles out of order)
            raise bad("messages", f"the model's chat template refused the conversation: {exc}") from None
        # The instance tokenizes a plain prompt with the tokenizer's special tokens; a template that writes
        # the BOS itself would get a second one.
        bos = getattr(tok, "bos_token", None)
        if bos and text.startswith(bos):
            ids = tok("x")["input_ids"]
            if ids and ids[0] == tok.bos_token_id:
                text = text[len(bos):]
        return str(text)

    async def render(self, model: str, source: str, messages: list[dict[str, str]]) -> str:
        # Loading a tokenizer reads files and may take a second: never on the event loop.
        return await asyncio.to_thread(self._render, model, source, messages)
