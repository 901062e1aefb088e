"""ModelInstanceActor: one loaded model on one device, serving requests token by token.

Decoding advances one token per request per ``Step`` message the actor sends itself, so between
two steps the inbox is served: a cancel, a new request or a migration order never waits for a
generation to end. Requests beyond ``max_concurrency`` wait in a queue, never dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pykka

from sllm_actors.gpu.engine import Engine, Sequence
from sllm_actors.messages import (
    AbortMigration,
    CancelInference,
    InferenceDone,
    InferenceFailed,
    InstanceReady,
    LoadFailed,
    MigrateOut,
    Migrated,
    MigrationEnded,
    PromptAccepted,
    ResumeDone,
    ResumeFailed,
    ResumeRequest,
    StartInference,
    TokenChunk,
)
from sllm_actors.node_context import Link, NodeContext
from sllm_actors.supervisor import SupervisedActor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """In-process: advance every running request by one token."""


@dataclass(frozen=True)
class MigrationTimeout:
    """In-process: a migration round got no answer in time."""

    migration_id: str
    request_id: str
    round: int


ROUND_TIMEOUT_S = 30.0
"""A round waits this long for its ResumeDone; then the migration aborts and the source goes on."""
PARKED_TTL_S = 120.0
"""A recomputed cache nobody continued (its source died, say) is dropped after this long."""


@dataclass
class Outgoing:
    """Source side: one request of a migration order."""

    migration_id: str
    dest_node: str
    dest_instance: str
    delta_tokens: int
    max_rounds: int
    round: int = 0
    sent_upto: int = 0
    tokens_recomputed: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Parked:
    """Destination side: a recomputed cache waiting for the router to route the request here."""

    seq: Sequence
    migration_id: str
    round: int
    since: float = field(default_factory=time.monotonic)


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
        self.link: Link | None = None
        self.running: dict[str, Sequence] = {}
        self.waiting: deque[StartInference] = deque()
        self.step_scheduled = False
        self.outgoing: dict[str, Outgoing] = {}
        """request id -> its migration state, while this instance is the source."""
        self.orders: dict[str, set[str]] = {}
        """migration id -> request ids not yet handed over."""
        self.parked: dict[str, Parked] = {}
        self.notes: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ lifecycle

    def _send(self, msg: Any, address: str = "") -> None:
        if self.link is not None:
            self.link.send(msg, address)
        else:
            self.node.send(msg, address)

    def started(self) -> None:
        self.link = self.node.open_link(self.instance_id)
        self._publish("loading")
        started = time.perf_counter()
        try:
            loaded = self.node.storage.load(self.model_name, self.source, self.device)
        except Exception as exc:  # any load problem is this request's failure, reported as data
            log.warning("%s: loading %s failed: %s", self.name, self.model_name, exc)
            self._send(LoadFailed(self.instance_id, self.node.name, self.model_name, f"{exc}"))
            self._publish("failed")
            self.actor_ref.stop(block=False)
            return
        self.engine = Engine(loaded.model, loaded.tokenizer)
        self.memory_bytes = loaded.memory_bytes
        load_s = time.perf_counter() - started
        self._publish("idle")
        self._send(
            InstanceReady(
                self.instance_id, self.node.name, self.gpu_index, self.model_name, load_s, loaded.tier,
                loaded.memory_bytes,
            )
        )
        self.node.event("load", f"{self.model_name} loaded on {self.node.name}/gpu-{self.gpu_index} from "
                        f"{loaded.tier} in {load_s:.2f}s", {"model": self.model_name, "tier": loaded.tier,
                                                              "seconds": load_s})

    def stopping(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
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
        elif isinstance(message, MigrateOut):
            self._migrate_out(message)
        elif isinstance(message, ResumeRequest):
            self._resume_in(message)
        elif isinstance(message, ResumeDone):
            self._round_done(message)
        elif isinstance(message, ResumeFailed):
            self._abort(message.migration_id, f"destination failed: {message.message}")
        elif isinstance(message, AbortMigration):
            self._abort(message.migration_id, message.reason)
        elif isinstance(message, MigrationTimeout):
            out = self.outgoing.get(message.request_id)
            if out is not None and out.migration_id == message.migration_id and out.round == message.round:
                self._abort(message.migration_id, f"round {message.round} got no answer in {ROUND_TIMEOUT_S:.0f}s")
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
        parked = self.parked.pop(msg.request_id, None)
        if parked is not None and prompt_ids and self._continue_parked(parked, msg):
            return
        try:
            if not prompt_ids:
                prompt_ids = self.engine.tokenize(msg.prompt, msg.chat)
                if not prompt_ids:
                    raise ValueError("the prompt tokenizes to nothing")
                self._send(PromptAccepted(msg.request_id, self.instance_id, prompt_ids))
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
            self._send(InferenceFailed(msg.request_id, self.instance_id, "bad_request", str(exc)))
            return
        if len(seq.generated_ids) >= seq.max_tokens:
            self._send(InferenceDone(msg.request_id, self.instance_id, "length", len(seq.generated_ids)))
            return
        self.running[msg.request_id] = seq
        self._publish()
        self._schedule_step()

    def _continue_parked(self, parked: Parked, msg: StartInference) -> bool:
        """Continue from a cache recomputed during a migration: only the last few tokens are new."""
        assert self.engine is not None
        seq = parked.seq
        have = seq.prompt_ids + seq.generated_ids
        log_ids = list(msg.prompt_ids) + list(msg.generated_ids)
        if log_ids[: len(have)] != have or seq.prompt_ids != list(msg.prompt_ids):
            log.warning("%s: parked cache of %s does not match the log; recomputing", self.name, msg.request_id)
            return False
        self.engine.extend(seq, log_ids[len(have):])
        seq.text = msg.text_so_far
        if len(seq.generated_ids) >= seq.max_tokens:
            self._send(InferenceDone(msg.request_id, self.instance_id, "length", len(seq.generated_ids)))
            return True
        if len(self.running) >= self.max_concurrency:
            # No room right now: requeue with the whole log; the cache is rebuilt when it gets a slot.
            self.waiting.append(msg)
            return True
        self.running[msg.request_id] = seq
        self._publish()
        self._schedule_step()
        return True

    # ------------------------------------------------------------------ live migration, source side

    def _migrate_out(self, msg: MigrateOut) -> None:
        pending: set[str] = set()
        for request_id in msg.request_ids:
            queued = next((w for w in self.waiting if w.request_id == request_id), None)
            if queued is not None:
                # Never started here: nothing to recompute, the router simply starts it there.
                self.waiting.remove(queued)
                self._send(Migrated(msg.migration_id, request_id, self.instance_id, msg.dest_node,
                                        msg.dest_instance, 0, 0, 0, 0.0))
                continue
            seq = self.running.get(request_id)
            if seq is None or request_id in self.outgoing:
                continue  # finished already, or in another migration
            out = Outgoing(msg.migration_id, msg.dest_node, msg.dest_instance, msg.delta_tokens, msg.max_rounds)
            self.outgoing[request_id] = out
            pending.add(request_id)
            self._send_round(seq, out, list(seq.prompt_ids), list(seq.generated_ids))
        if pending:
            self.orders[msg.migration_id] = pending
            self._publish()
        else:
            self._send(MigrationEnded(msg.migration_id, self.instance_id, "done", "nothing left to migrate"))

    def _send_round(self, seq: Sequence, out: Outgoing, prompt_ids: list[int], new_ids: list[int]) -> None:
        out.sent_upto = len(seq.generated_ids)
        out.tokens_recomputed += len(prompt_ids) + len(new_ids)
        self._send(
            ResumeRequest(
                migration_id=out.migration_id, round=out.round, request_id=seq.request_id,
                instance_id=out.dest_instance, source_node=self.node.name, source_instance=self.instance_id,
                prompt_ids=prompt_ids, generated_ids=new_ids, max_tokens=seq.max_tokens,
                temperature=seq.temperature, top_p=seq.top_p, seed=seq.seed, stop=seq.stop, text_so_far=seq.text,
            ),
            out.dest_node,
        )
        timeout = MigrationTimeout(out.migration_id, seq.request_id, out.round)
        timer = threading.Timer(ROUND_TIMEOUT_S, self._tell_quietly, args=(timeout,))
        timer.daemon = True
        timer.start()

    def _tell_quietly(self, message: Any) -> None:
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            pass  # the instance is gone, and its migrations with it

    def _round_done(self, msg: ResumeDone) -> None:
        out = self.outgoing.get(msg.request_id)
        if out is None or out.migration_id != msg.migration_id or out.round != msg.round:
            return  # late or repeated: that round is settled
        seq = self.running.get(msg.request_id)
        if seq is None:
            # It finished here while the destination recomputed: nothing to hand over.
            self._settle(msg.request_id, out, f"{msg.request_id} finished at the source first")
            return
        new_ids = seq.generated_ids[out.sent_upto :]
        if len(new_ids) >= out.delta_tokens and out.round + 1 < out.max_rounds:
            out.round += 1
            self._send_round(seq, out, [], new_ids)
            return
        # Few enough tokens left: stop here; the router re-routes with the whole log.
        self.running.pop(msg.request_id)
        self._send(Migrated(
            out.migration_id, msg.request_id, self.instance_id, out.dest_node, out.dest_instance,
            len(seq.generated_ids), out.round + 1, out.tokens_recomputed, time.perf_counter() - out.started,
        ))
        self.node.event("migrate", f"{msg.request_id} migrated to {out.dest_node}/{out.dest_instance} after "
                        f"{out.round + 1} round(s), {out.tokens_recomputed} tokens recomputed",
                        {"request_id": msg.request_id})
        self._settle(msg.request_id, out)
        self._admit_waiting()
        self._publish()

    def _settle(self, request_id: str, out: Outgoing, note: str = "") -> None:
        self.outgoing.pop(request_id, None)
        if note:
            self.notes.setdefault(out.migration_id, []).append(note)
        pending = self.orders.get(out.migration_id)
        if pending is None:
            return
        pending.discard(request_id)
        if not pending:
            del self.orders[out.migration_id]
            detail = "; ".join(self.notes.pop(out.migration_id, []))
            self._send(MigrationEnded(out.migration_id, self.instance_id, "done", detail))

    def _abort(self, migration_id: str, reason: str) -> None:
        pending = self.orders.pop(migration_id, None)
        if pending is None:
            return
        self.notes.pop(migration_id, None)
        for request_id in pending:
            self.outgoing.pop(request_id, None)
        log.warning("%s: migration %s aborted: %s; generation goes on here", self.name, migration_id, reason)
        self.node.event("migrate", f"migration {migration_id} aborted: {reason}", {"migration_id": migration_id})
        self._send(MigrationEnded(migration_id, self.instance_id, "aborted", reason))
        self._publish()

    # ------------------------------------------------------------------ live migration, destination side

    def _resume_in(self, msg: ResumeRequest) -> None:
        assert self.engine is not None
        self._expire_parked()
        started = time.perf_counter()
        try:
            if msg.round == 0:
                seq = Sequence(
                    request_id=msg.request_id, prompt_ids=list(msg.prompt_ids), generated_ids=list(msg.generated_ids),
                    max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p, seed=msg.seed,
                    stop=list(msg.stop), text=msg.text_so_far,
                )
                self.engine.prefill(seq)
                self.parked[msg.request_id] = Parked(seq, msg.migration_id, 0)
            else:
                parked = self.parked.get(msg.request_id)
                if parked is None or parked.migration_id != msg.migration_id or parked.round != msg.round - 1:
                    raise ValueError(f"round {msg.round} of {msg.migration_id} does not follow what is here")
                self.engine.extend(parked.seq, list(msg.generated_ids))
                parked.round = msg.round
                parked.since = time.monotonic()
        except (ValueError, RuntimeError) as exc:
            self._send(ResumeFailed(msg.migration_id, msg.round, msg.request_id, msg.source_instance, str(exc)),
                           msg.source_node)
            return
        n_tokens = len(msg.prompt_ids) + len(msg.generated_ids)
        self._send(ResumeDone(msg.migration_id, msg.round, msg.request_id, msg.source_instance, n_tokens,
                                  time.perf_counter() - started), msg.source_node)

    def _expire_parked(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, p in self.parked.items() if now - p.since > PARKED_TTL_S]:
            del self.parked[request_id]

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
            self._send(TokenChunk(seq.request_id, index, [token], delta))
            if seq.finish_reason:
                finished.append(seq)
        for seq in finished:
            self.running.pop(seq.request_id, None)
            self._send(InferenceDone(seq.request_id, self.instance_id, seq.finish_reason, len(seq.generated_ids)))
        if finished:
            self._admit_waiting()
            self._publish()
        self._schedule_step()

    def _admit_waiting(self) -> None:
        while self.waiting and len(self.running) < self.max_concurrency:
            self._start(self.waiting.popleft())

    def _publish(self, state: str | None = None) -> None:
        if state is None:
            state = "migrating" if self.outgoing else "running" if self.running else "idle"
        self.node.board.update_instance(
            self.instance_id,
            model=self.model_name,
            gpu=self.gpu_index,
            state=state,
            requests=sorted(self.running),
            queued=len(self.waiting),
            memory_bytes=getattr(self, "memory_bytes", 0),
        )
