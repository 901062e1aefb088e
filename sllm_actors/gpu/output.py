"""The instance's output processor: detokenization and stop strings on a thread of their own, off the step thread.

An engine step's host work is on the critical path of the next step; the text of each token (a tokenizer call
per request per step) and the stop-string search are not needed by the next step, so the step thread hands the
step's token ids here and goes on (vLLM V1 runs its output processor in its front-end process for the same
reason). The processor turns them into text, cuts a stream at its stop string, and sends the step's
:class:`~sllm_actors.messages.TokenBatch`.

Order: every message of the instance about its requests leaves through this one queue and this one thread (the
instance's ``send`` enqueues here), so a request's last tokens always reach the router before its
``InferenceDone``, as when the step thread sent both.

A stop string is found here, a step or two after its token was sampled: the processor sends the stream's cut text
and its ``InferenceDone`` (reason ``stop``) at once, drops whatever the engine made for that request since, and
calls ``on_stop`` so the instance takes the request out of its batch. What the client sees is exactly what the
step thread's own check sent: sampling is a function of (seed, step), and the tokens after the stop are never
reported.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sllm_actors.gpu.detokenizer import IncrementalDetokenizer
from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import InferenceDone, InferenceFailed, Message, TokenBatch
from sllm_actors.runtime import trace

__all__ = ["OutputProcessor", "StepTokens", "find_stop"]

log = logging.getLogger(__name__)

REMEMBERED_STOPS = 4096
"""Requests stopped here whose later messages (tokens the engine made meanwhile, a late ``InferenceDone``) are
dropped; the oldest are forgotten (a request's messages stop once the instance took it out of its batch)."""


def find_stop(text: str, delta: str, stop: list[str]) -> int:
    """Where the first stop string starts in ``text + delta`` if one ends inside ``delta`` (-1: none). Only the
    tail that can hold a new match is searched."""
    if not stop or not delta:
        return -1
    combined = text + delta
    return min((i for i in (combined.find(s, max(0, len(text) - len(s))) for s in stop) if i >= 0), default=-1)


@dataclass
class StepTokens:
    """One step's new tokens, in the order the engine sampled them: ``(request, index in its generated ids,
    token id, whether it is an end-of-sequence token)``."""

    tokens: list[tuple[Sequence, int, int, bool]]


class OutputProcessor:
    """Detokenizes and sends an instance's tokens in order with its other messages, on a thread of its own."""

    def __init__(self, tokenizer: Any, instance_id: str, send: Callable[[Message, str], None],
                 on_stop: Callable[[str, int], None], name: str = "output") -> None:
        self.tokenizer = tokenizer
        self.instance_id = instance_id
        self._send = send
        self._on_stop = on_stop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped: OrderedDict[str, int] = OrderedDict()
        """request id -> generated tokens it stopped at."""
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name=f"{name}-output", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the step thread's side

    def tokens(self, step: StepTokens) -> None:
        """A step's tokens: their text and their TokenBatch follow, after everything queued before."""
        self._put(step)

    def message(self, msg: Message, address: str = "") -> None:
        """Send ``msg`` after everything queued before it."""
        self._put((msg, address))

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is sent (a migration reads a request's text after this)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _put(self, item: Any) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(item)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if isinstance(item, StepTokens):
                    self._step(item)
                else:
                    self._message(*item)
            except Exception:  # a broken send must not silence every later stream of the instance
                log.exception("%s: output processing failed", self.instance_id)
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def _message(self, msg: Message, address: str) -> None:
        if isinstance(msg, (InferenceDone, InferenceFailed)) and msg.request_id in self._stopped:
            return  # the stream already ended at its stop string
        self._send(msg, address)

    def _step(self, step: StepTokens) -> None:
        ids: list[str] = []
        indexes: list[int] = []
        token_ids: list[list[int]] = []
        texts: list[str] = []
        stops: list[tuple[str, int]] = []
        first: list[str] = []
        for seq, index, token, eos in step.tokens:
            if seq.request_id in self._stopped:
                continue  # made by the engine after its stop string, before the instance took it out
            if seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, seq.generated_ids[:index])
            delta = seq.detok.push(token)
            if eos:
                delta = ""
            else:
                cut = find_stop(seq.text, delta, seq.sampling.stop)
                if cut >= 0:
                    combined = seq.text + delta
                    delta = combined[:cut][len(seq.text):]
                    seq.text = combined[:cut]
                    stops.append((seq.request_id, index + 1))
                else:
                    seq.text += delta
            ids.append(seq.request_id)
            indexes.append(index)
            token_ids.append([token])
            texts.append(delta)
            if index == 0:
                first.append(seq.request_id)
        if ids:
            self._send(TokenBatch(self.instance_id, ids, indexes, token_ids, texts), "")
            if first and trace.enabled():
                trace.mark_many(first, "token_sent")
        for request_id, n_generated in stops:
            self._stopped[request_id] = n_generated
            while len(self._stopped) > REMEMBERED_STOPS:
                self._stopped.popitem(last=False)
            self._send(InferenceDone(request_id, self.instance_id, "stop", n_generated), "")
            self._on_stop(request_id, n_generated)
