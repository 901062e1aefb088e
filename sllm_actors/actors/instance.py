"""ModelInstanceActor: one loaded model on one device, serving requests token by token.

Decoding advances one token per request per ``Step`` message the actor sends itself, so between
two steps the inbox is served: a cancel, a new request or a migration order never waits for a
generation to end. Requests beyond ``max_concurrency`` wait in a queue, never dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import pykka

from sllm_actors.gpu.engine import Engine, Sequence
from sllm_actors.messages import (
    CancelInference,
    InferenceDone,
    InferenceFailed,
    InstanceReady,
    LoadFailed,
    PromptAccepted,
    StartInference,
    TokenChunk,
)
from sllm_actors.node_context import NodeContext
from sllm_actors.supervisor import SupervisedActor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """In-process: advance every running request by one token."""


class ModelInstanceActor(SupervisedActor):
    def __init__(
        self,
        supervisor: pykka.ActorRef[Any],
        name: str,
        *,
        node: NodeContext,
        instance_id: str,
        model_name: str,
        source: str,
        gpu_index: int,
        device: str,
        max_concurrency: int,
    ) -> None:
        super().__init__(supervisor, name)
        self.node = node
        self.instance_id = instance_id
        self.model_name = model_name
        self.source = source
        self.gpu_index = gpu_index
        self.device = device
        self.max_concurrency = max(1, max_concurrency)
        self.engine: Engine | None = None
        self.running: dict[str, Sequence] = {}
        self.waiting: deque[StartInference] = deque()
        self.step_scheduled = False

    # ------------------------------------------------------------------ lifecycle

    def started(self) -> None:
        self._publish("loading")
        started = time.perf_counter()
        try:
            loaded = self.node.storage.load(self.model_name, self.source, self.device)
        except Exception as exc:  # any load problem is this request's failure, reported as data
            log.warning("%s: loading %s failed: %s", self.name, self.model_name, exc)
            self.node.send(LoadFailed(self.instance_id, self.node.name, self.model_name, f"{exc}"))
            self._publish("failed")
            self.actor_ref.stop(block=False)
            return
        self.engine = Engine(loaded.model, loaded.tokenizer)
        self.memory_bytes = loaded.memory_bytes
        load_s = time.perf_counter() - started
        self._publish("idle")
        self.node.send(
            InstanceReady(
                self.instance_id, self.node.name, self.gpu_index, self.model_name, load_s, loaded.tier,
                loaded.memory_bytes,
            )
        )
        self.node.event("load", f"{self.model_name} loaded on {self.node.name}/gpu-{self.gpu_index} from "
                        f"{loaded.tier} in {load_s:.2f}s", {"model": self.model_name, "tier": loaded.tier,
                                                              "seconds": load_s})

    def stopping(self) -> None:
        self.node.board.remove_instance(self.instance_id)
        self.engine = None
        self.running.clear()

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Step):
            self.step_scheduled = False
            self._step_all()
        elif isinstance(message, StartInference):
            self._admit(message)
        elif isinstance(message, CancelInference):
            self._cancel(message.request_id)
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    def _admit(self, msg: StartInference) -> None:
        if msg.request_id in self.running or any(w.request_id == msg.request_id for w in self.waiting):
            return  # a duplicate (the router retried); the request is already here
        if len(self.running) >= self.max_concurrency:
            self.waiting.append(msg)
            self._publish()
            return
        self._start(msg)

    def _start(self, msg: StartInference) -> None:
        assert self.engine is not None
        prompt_ids = list(msg.prompt_ids)
        try:
            if not prompt_ids:
                prompt_ids = self.engine.tokenize(msg.prompt, msg.chat)
                if not prompt_ids:
                    raise ValueError("the prompt tokenizes to nothing")
                self.node.send(PromptAccepted(msg.request_id, self.instance_id, prompt_ids))
            if len(prompt_ids) + len(msg.generated_ids) >= self.engine.max_positions:
                raise ValueError(
                    f"{len(prompt_ids) + len(msg.generated_ids)} tokens exceed the model's context of "
                    f"{self.engine.max_positions}"
                )
            seq = Sequence(
                request_id=msg.request_id,
                prompt_ids=prompt_ids,
                generated_ids=list(msg.generated_ids),
                max_tokens=msg.max_tokens,
                temperature=msg.temperature,
                top_p=msg.top_p,
                seed=msg.seed,
                stop=list(msg.stop),
                text=msg.text_so_far,
            )
            self.engine.prefill(seq)
        except ValueError as exc:
            self.node.send(InferenceFailed(msg.request_id, self.instance_id, "bad_request", str(exc)))
            return
        if len(seq.generated_ids) >= seq.max_tokens:
            self.node.send(InferenceDone(msg.request_id, self.instance_id, "length", len(seq.generated_ids)))
            return
        self.running[msg.request_id] = seq
        self._publish()
        self._schedule_step()

    def _cancel(self, request_id: str) -> None:
        self.waiting = deque(w for w in self.waiting if w.request_id != request_id)
        if self.running.pop(request_id, None) is not None:
            self._admit_waiting()
        self._publish()

    # ------------------------------------------------------------------ decoding

    def _schedule_step(self) -> None:
        if not self.step_scheduled and self.running:
            self.step_scheduled = True
            self.actor_ref.tell(Step())

    def _step_all(self) -> None:
        assert self.engine is not None
        finished = []
        for seq in list(self.running.values()):
            index = len(seq.generated_ids)
            token, delta = self.engine.step(seq)
            self.node.send(TokenChunk(seq.request_id, index, [token], delta))
            if seq.finish_reason:
                finished.append(seq)
        for seq in finished:
            self.running.pop(seq.request_id, None)
            self.node.send(InferenceDone(seq.request_id, self.instance_id, seq.finish_reason, len(seq.generated_ids)))
        if finished:
            self._admit_waiting()
            self._publish()
        self._schedule_step()

    def _admit_waiting(self) -> None:
        while self.waiting and len(self.running) < self.max_concurrency:
            self._start(self.waiting.popleft())

    def _publish(self, state: str | None = None) -> None:
        if state is None:
            state = "running" if self.running else "idle"
        self.node.board.update_instance(
            self.instance_id,
            model=self.model_name,
            gpu=self.gpu_index,
            state=state,
            requests=sorted(self.running),
            queued=len(self.waiting),
            memory_bytes=getattr(self, "memory_bytes", 0),
        )
