"""Streams a fault test keeps open across a kill: a ZeroMQ client's and an HTTP client's, each on a thread of its own,
recording every token (and, for ZeroMQ, each chunk's index) so the test can assert one stream, none lost or repeated."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import httpx

from sllm_actors.client import Client, Completion, TokenEvent

__all__ = ["HttpStream", "ZmqStream"]


class ZmqStream(threading.Thread):
    """A greedy request for the ``slow`` model through a client ``connect()`` makes; ``flowing`` is set once
    ``flowing_after`` tokens have come (the moment to kill something), or when the stream ends."""

    def __init__(self, connect: Callable[[], Client], prompt: str, max_tokens: int, flowing_after: int = 2) -> None:
        super().__init__(daemon=True)
        self.connect, self.prompt, self.max_tokens, self.flowing_after = connect, prompt, max_tokens, flowing_after
        self.tokens: list[int] = []
        self.indexes: list[int] = []
        self.done: Completion | None = None
        self.error: BaseException | None = None
        self.flowing = threading.Event()

    def run(self) -> None:
        try:
            with self.connect() as client:
                for event in client.generate("slow", self.prompt, max_tokens=self.max_tokens, temperature=0.0):
                    if isinstance(event, TokenEvent):
                        self.indexes.append(event.index)
                        self.tokens += event.token_ids
                        if len(self.tokens) >= self.flowing_after:
                            self.flowing.set()
                    elif isinstance(event, Completion):
                        self.done = event
        except BaseException as exc:  # noqa: BLE001 - reported by the test's assertions
            self.error = exc
        finally:
            self.flowing.set()


class HttpStream(threading.Thread):
    """The same request as an SSE stream from ``/v1/completions`` at ``base`` (token ids returned)."""

    def __init__(self, base: str, prompt: str, max_tokens: int, flowing_after: int = 2) -> None:
        super().__init__(daemon=True)
        self.base, self.prompt, self.max_tokens, self.flowing_after = base, prompt, max_tokens, flowing_after
        self.tokens: list[int] = []
        self.finish_reason = ""
        self.error: BaseException | None = None
        self.flowing = threading.Event()

    def run(self) -> None:
        body = {"model": "slow", "prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "return_token_ids": True}
        try:
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choices = json.loads(line[len("data: "):])["choices"]
                    if choices:
                        self.tokens += choices[0].get("token_ids", [])
                        self.finish_reason = choices[0].get("finish_reason") or self.finish_reason
                    if len(self.tokens) >= self.flowing_after:
                        self.flowing.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test's assertions
            self.error = exc
        finally:
            self.flowing.set()
