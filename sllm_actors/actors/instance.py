"""ModelInstanceActor: one loaded model on one device, serving requests token by token.

Decoding advances one token per request per ``Step`` message the actor sends itself, so between
two steps the inbox is served: a cancel, a new request or a migration order never waits for a
generation to end. Requests beyond ``max_concurrency`` wait in a queue, never dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pykka
import torch

from sllm_actors import placement
from sllm_actors.gpu.engine import Engine, Sequence
from sllm_actors.messages import (
    KV_CHUNK_BYTES,
    AbortMigration,
    CancelInference,
    InferenceDone,
    InferenceFailed,
    InstanceReady,
    KvCopyBegin,
    KvCopyChunk,
    LoadFailed,
    Migrated,
    MigrateOut,
    MigrationEnded,
    PromptAccepted,
    ResumeDone,
    ResumeFailed,
    ResumeRequest,
    StartInference,
    TokenChunk,
)
from sllm_actors.node_context import Link, NodeContext
from sllm_actors.storage.format import crc32
from sllm_actors.storage_client import SERIAL_PARTS, format_parts
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
COPY_TIMEOUT_MIN_S = 10.0
"""A KV copy waits at least this long (or 10x its estimate) for its ResumeDone, then recomputes instead."""
COPY_SEND_SHARE = 0.25
"""Time spent sending KV-copy chunks after a decode step, as a share of that step's time."""
COPY_SEND_MIN_S = 0.005
FINISHED_TTL_S = 60.0
"""How long a finished request's id is remembered, so a late duplicate StartInference does not restart it."""
FAULT_ENV = "SLLM_FAULT_KV_COPY"
"""Fault injection for tests: ``corrupt`` flips a byte of every KV copy after its checksum, ``short``
cuts its last chunk in half. The destination must refuse the copy and the source recompute instead."""


class CacheChunks:
    """A KV cache's bytes, layer after layer, as ``chunk_bytes`` pieces cut one at a time from byte views of
    the cache's own tensors: no copy of the whole cache is ever made. Valid while those tensors are unchanged;
    a decode step replaces a DynamicCache's tensors (it concatenates) rather than writing into them.

    ``fault`` (tests, :data:`FAULT_ENV`): ``corrupt`` flips a byte of the last chunk after the checksum was
    taken, ``short`` sends half of it.
    """

    def __init__(self, tensors: list[torch.Tensor], chunk_bytes: int, fault: str = "") -> None:
        self.views = [memoryview(t.detach().contiguous().view(torch.uint8).reshape(-1).cpu().numpy())
                      for t in tensors]
        self.total = sum(len(v) for v in self.views)
        self.chunk_bytes = chunk_bytes
        self.count = max(1, -(-self.total // chunk_bytes))
        self.fault = fault
        self.sent = 0
        self._view = 0
        self._offset = 0

    def crc32(self) -> int:
        value = 0
        for view in self.views:
            value = crc32(view, value)
        return value

    def done(self) -> bool:
        return self.sent >= self.count

    def take(self) -> bytes:
        need = min(self.chunk_bytes, self.total - self.sent * self.chunk_bytes)
        pieces = []
        while need > 0:
            view = self.views[self._view]
            n = min(need, len(view) - self._offset)
            pieces.append(view[self._offset:self._offset + n])
            need -= n
            self._offset += n
            if self._offset == len(view):
                self._view, self._offset = self._view + 1, 0
        self.sent += 1
        data = b"".join(pieces)
        if self.sent == self.count and self.fault == "corrupt":
            bad = bytearray(data)
            bad[len(bad) // 2] ^= 0xFF
            data = bytes(bad)
        elif self.sent == self.count and self.fault == "short":
            data = data[: len(data) // 2]
        return data


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
    transfer: str = "recompute"
    kv_bytes: int = 0
    copy_pending: bool = False
    """A KV copy is round ``round``, not yet answered."""
    copy_started: float = 0.0
    copy_s: float = 0.0
    copy_rebuild_s: float = 0.0
    note: str = ""
    chunks: CacheChunks | None = None
    """A KV copy's chunks not sent yet (sent a few per decode step)."""
    copy_estimate_s: float = 0.0


@dataclass
class Incoming:
    """Destination side: a KV copy whose chunks are arriving."""

    begin: KvCopyBegin
    chunks: dict[int, bytes] = field(default_factory=dict)
    since: float = field(default_factory=time.monotonic)


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
        self.incoming: dict[str, Incoming] = {}
        """request id -> a KV copy being received (destination side)."""
        self.finished: dict[str, float] = {}
        """request id -> when it finished here (a duplicate StartInference for it is ignored)."""
        self.notes: dict[str, list[str]] = {}
        self.prefill_cost = placement.MigrationCost()
        """This instance's own prefills (tokens, seconds): what recomputing a cache costs on this model and
        device, for the copy-or-recompute choice before the scheduler has fitted real migrations."""

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
                loaded.memory_bytes, {**loaded.parts, "engine": load_s - sum(
                    loaded.parts.get(p, 0.0) for p in SERIAL_PARTS)},
            )
        )
        self.node.event("load", f"{self.model_name} loaded on {self.node.name}/gpu-{self.gpu_index} from "
                        f"{loaded.tier} in {load_s:.2f}s ({format_parts(loaded.parts)})",
                        {"model": self.model_name, "tier": loaded.tier, "seconds": load_s, "parts": loaded.parts})

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
        elif isinstance(message, KvCopyBegin):
            self._copy_begin(message)
        elif isinstance(message, KvCopyChunk):
            self._copy_chunk(message)
        elif isinstance(message, ResumeDone):
            self._round_done(message)
        elif isinstance(message, ResumeFailed):
            out = self.outgoing.get(message.request_id)
            if message.copy_failed:
                if out is not None and out.migration_id == message.migration_id and out.round == message.round \
                        and out.copy_pending:
                    self._copy_fallback(message.request_id, out, message.message)
            else:
                self._abort(message.migration_id, f"destination failed: {message.message}")
        elif isinstance(message, AbortMigration):
            self._abort(message.migration_id, message.reason)
        elif isinstance(message, MigrationTimeout):
            out = self.outgoing.get(message.request_id)
            if out is not None and out.migration_id == message.migration_id and out.round == message.round:
                if out.copy_pending:
                    self._copy_fallback(message.request_id, out, "no answer in time")
                else:
                    self._abort(message.migration_id,
                                f"round {message.round} got no answer in {ROUND_TIMEOUT_S:.0f}s")
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    def _admit(self, msg: StartInference) -> None:
        if msg.request_id in self.running or any(w.request_id == msg.request_id for w in self.waiting):
            return  # a duplicate (the router's after a hand-over, say); the request is already here
        if msg.request_id in self.finished:
            return  # handed over, then finished here before the router's StartInference arrived
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
            self._prefill(seq)
        except ValueError as exc:
            self._send(InferenceFailed(msg.request_id, self.instance_id, "bad_request", str(exc)))
            return
        if len(seq.generated_ids) >= seq.max_tokens:
            self._finish(seq, "length")
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
        if len(self.running) >= self.max_concurrency:
            # No room right now: requeue with the whole log; the cache is rebuilt when it gets a slot.
            self.waiting.append(msg)
            return True
        self.engine.extend(seq, log_ids[len(have):])
        seq.text = msg.text_so_far
        self._run_now(seq)
        return True

    def _prefill(self, seq: Sequence) -> None:
        assert self.engine is not None
        seconds = self.engine.prefill(seq)
        self.prefill_cost.observe(len(seq.tokens), seconds)

    def _run_now(self, seq: Sequence) -> None:
        """Start decoding a request whose cache is ready: its first token right away (the catch-up's
        forward already produced its logits), the rest on the usual Steps."""
        if len(seq.generated_ids) >= seq.max_tokens:
            self._finish(seq, "length")
            return
        self.running[seq.request_id] = seq
        self._step_one(seq)
        self._publish()
        self._schedule_step()

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.running.pop(seq.request_id, None)
        self._flush_copy(seq.request_id)
        self.finished[seq.request_id] = time.monotonic()
        self._send(InferenceDone(seq.request_id, self.instance_id, reason, len(seq.generated_ids)))

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
            self._first_round(seq, out, msg)
        if pending:
            self.orders[msg.migration_id] = pending
            self._publish()
        else:
            self._send(MigrationEnded(msg.migration_id, self.instance_id, "done", "nothing left to migrate"))

    def _first_round(self, seq: Sequence, out: Outgoing, msg: MigrateOut) -> None:
        """Round 0: the KV cache itself or the tokens to recompute it from, whichever the cost model picks."""
        assert self.engine is not None
        kv_bytes = 0
        try:
            _, layers = self.engine.export_cache(seq)
            kv_bytes = sum(t.numel() * t.element_size() for pair in layers for t in pair)
        except ValueError:
            pass  # no cache to copy: recompute
        # Recompute: the scheduler's fit from real migrations, unless this instance has timed prefills of
        # its own on this model and device (the scheduler's default figures are a guess).
        recompute = self.prefill_cost if len(self.prefill_cost.samples) >= 2 else \
            placement.MigrationCost(msg.recompute_a, msg.recompute_b)
        choice = placement.choose_transfer(
            msg.transfer, kv_bytes, len(seq.tokens), recompute,
            placement.LinkCost(msg.link_bytes_per_s, msg.copy_fixed_s),
        )
        out.note = f"{msg.transfer}: {choice.describe()}" if msg.transfer == "auto" else ""
        if choice.kind == "copy":
            try:
                self._send_copy(seq, out, choice.copy_s)
                return
            except (ValueError, RuntimeError, TypeError) as exc:
                log.warning("%s: cannot copy the KV cache of %s (%s); recomputing", self.name, seq.request_id, exc)
                out.note = f"KV copy not possible ({exc}); recomputed from the tokens"
        self._send_round(seq, out, list(seq.prompt_ids), list(seq.generated_ids))

    def _send_copy(self, seq: Sequence, out: Outgoing, estimate_s: float) -> None:
        """Send the request's KV cache to the destination: its layers' bytes in chunks, with a checksum.

        The chunks are cut from the cache's own tensors one at a time and sent a few after each decode
        step (:meth:`_pump_copies`), never all at once: this runs on the instance's thread, so a whole 4k-token
        cache serialized here in one go was a late token for the client (4 steps of pause on a CPU).
        """
        assert self.engine is not None
        started = time.perf_counter()
        n_cached, layers = self.engine.export_cache(seq)
        dtype = layers[0][0].dtype
        shapes = [[list(keys.shape), list(values.shape)] for keys, values in layers]
        chunks = CacheChunks([t for pair in layers for t in pair], KV_CHUNK_BYTES, os.environ.get(FAULT_ENV, ""))
        out.transfer, out.kv_bytes, out.copy_pending, out.copy_started = "copy", chunks.total, True, started
        out.sent_upto = len(seq.generated_ids)
        out.chunks, out.copy_estimate_s = chunks, estimate_s
        self._send(KvCopyBegin(
            migration_id=out.migration_id, round=out.round, request_id=seq.request_id, instance_id=out.dest_instance,
            source_node=self.node.name, source_instance=self.instance_id, prompt_ids=list(seq.prompt_ids),
            generated_ids=list(seq.generated_ids), max_tokens=seq.max_tokens, temperature=seq.temperature,
            top_p=seq.top_p, seed=seq.seed, stop=list(seq.stop), text_so_far=seq.text, n_cached=n_cached,
            dtype=str(dtype).removeprefix("torch."), shapes=shapes, total_bytes=chunks.total, crc32=chunks.crc32(),
            n_chunks=chunks.count,
        ), out.dest_node)
        self._pump_copies(budget_s=COPY_SEND_MIN_S)

    def _pump_copies(self, budget_s: float, only: str = "") -> None:
        """Send the next chunks of every KV copy under way, for about ``budget_s`` (at least one chunk each;
        ``budget_s`` of infinity sends the rest). ``only``: just that request's copy."""
        deadline = time.perf_counter() + budget_s
        for request_id, out in list(self.outgoing.items()):
            chunks = out.chunks
            if chunks is None or (only and request_id != only):
                continue
            while not chunks.done():
                index = chunks.sent
                self._send(KvCopyChunk(out.migration_id, out.round, request_id, out.dest_instance, index,
                                       chunks.take()), out.dest_node)
                if time.perf_counter() >= deadline:
                    break
            if chunks.done():
                out.chunks = None
                self._arm_timer(request_id, out, max(COPY_TIMEOUT_MIN_S, 10 * out.copy_estimate_s))

    def _copy_fallback(self, request_id: str, out: Outgoing, reason: str) -> None:
        """The copy was refused or lost: recompute from the tokens instead, in the next round."""
        out.copy_pending = False
        out.chunks = None
        out.transfer = "recompute"
        out.note = f"KV copy failed ({reason}); recomputed from the tokens"
        log.warning("%s: %s: %s", self.name, request_id, out.note)
        self.node.event("migrate", f"{request_id}: {out.note}", {"request_id": request_id})
        seq = self.running.get(request_id)
        if seq is None:
            self._settle(request_id, out, f"{request_id} finished at the source first")
            return
        out.round += 1
        out.max_rounds += 1
        self._send_round(seq, out, list(seq.prompt_ids), list(seq.generated_ids))

    def _send_round(self, seq: Sequence, out: Outgoing, prompt_ids: list[int], new_ids: list[int]) -> None:
        out.sent_upto = len(seq.generated_ids)
        out.tokens_recomputed += len(prompt_ids) + len(new_ids)
        self._send(self._resume_message(seq, out, prompt_ids, new_ids), out.dest_node)
        self._arm_timer(seq.request_id, out, ROUND_TIMEOUT_S)

    def _resume_message(self, seq: Sequence, out: Outgoing, prompt_ids: list[int], new_ids: list[int],
                        final: bool = False) -> ResumeRequest:
        return ResumeRequest(
            migration_id=out.migration_id, round=out.round, request_id=seq.request_id,
            instance_id=out.dest_instance, source_node=self.node.name, source_instance=self.instance_id,
            prompt_ids=prompt_ids, generated_ids=new_ids, max_tokens=seq.max_tokens,
            temperature=seq.temperature, top_p=seq.top_p, seed=seq.seed, stop=seq.stop, text_so_far=seq.text,
            final=final,
        )

    def _arm_timer(self, request_id: str, out: Outgoing, seconds: float) -> None:
        timeout = MigrationTimeout(out.migration_id, request_id, out.round)
        timer = threading.Timer(seconds, self._tell_quietly, args=(timeout,))
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
        if out.copy_pending:
            out.copy_pending = False
            out.copy_s = time.perf_counter() - out.copy_started
            out.copy_rebuild_s = msg.recompute_s
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
        # Few enough tokens left: stop here. The router learns first (it re-routes, and its StartInference
        # is the safety net); the destination gets the last tokens straight from here and starts decoding
        # without waiting for the router. Both go on this one socket, so the router sees Migrated before
        # any token of the destination.
        self.running.pop(msg.request_id)
        rounds = out.round + 1
        self._send(Migrated(
            out.migration_id, msg.request_id, self.instance_id, out.dest_node, out.dest_instance,
            len(seq.generated_ids), rounds, out.tokens_recomputed + len(new_ids), time.perf_counter() - out.started,
            out.transfer, out.kv_bytes, out.copy_s, out.note, out.copy_rebuild_s,
        ))
        out.round += 1
        self._send(self._resume_message(seq, out, [], list(new_ids), final=True), out.dest_node)
        how = (f"KV cache copied ({out.kv_bytes / 1e6:.1f} MB in {out.copy_s:.2f}s)" if out.transfer == "copy"
               else f"{out.tokens_recomputed} tokens recomputed")
        self.node.event("migrate", f"{msg.request_id} migrated to {out.dest_node}/{out.dest_instance} after "
                        f"{rounds} round(s), {how}",
                        {"request_id": msg.request_id, "transfer": out.transfer, "kv_bytes": out.kv_bytes,
                         "copy_s": out.copy_s, "note": out.note})
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
        if msg.final:
            self._handover(msg)
            return
        started = time.perf_counter()
        try:
            if msg.prompt_ids:
                # The whole log (round 0, or a recompute after a refused KV copy): a fresh cache.
                self.incoming.pop(msg.request_id, None)
                seq = Sequence(
                    request_id=msg.request_id, prompt_ids=list(msg.prompt_ids), generated_ids=list(msg.generated_ids),
                    max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p, seed=msg.seed,
                    stop=list(msg.stop), text=msg.text_so_far,
                )
                self._prefill(seq)
                self.parked[msg.request_id] = Parked(seq, msg.migration_id, msg.round)
            else:
                parked = self._parked_for(msg.request_id, msg.migration_id, msg.round)
                if parked is None:
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

    def _parked_for(self, request_id: str, migration_id: str, round_: int) -> Parked | None:
        parked = self.parked.get(request_id)
        if parked is None or parked.migration_id != migration_id or parked.round != round_ - 1:
            return None
        return parked

    def _handover(self, msg: ResumeRequest) -> None:
        """The source stopped: feed its last tokens and decode from here at once."""
        assert self.engine is not None
        request_id = msg.request_id
        if request_id in self.running or request_id in self.finished \
                or any(w.request_id == request_id for w in self.waiting):
            return  # the router's StartInference came first and continued it
        parked = self._parked_for(request_id, msg.migration_id, msg.round)
        if parked is None:
            # Nothing to continue from: the router's StartInference (on its way) rebuilds from the log.
            log.warning("%s: hand-over of %s (%s round %d) does not follow what is here", self.name, request_id,
                        msg.migration_id, msg.round)
            return
        try:
            self.engine.extend(parked.seq, list(msg.generated_ids))
        except (ValueError, RuntimeError) as exc:
            log.warning("%s: hand-over of %s failed (%s); the router's StartInference restarts it", self.name,
                        request_id, exc)
            self.parked.pop(request_id, None)
            return
        parked.round, parked.since = msg.round, time.monotonic()
        parked.seq.text = msg.text_so_far
        if len(self.running) >= self.max_concurrency:
            return  # stays parked, caught up; the router's StartInference queues it for a slot
        del self.parked[request_id]
        self._run_now(parked.seq)

    # ------------------------------------------------------------------ KV copy, destination side

    def _copy_begin(self, msg: KvCopyBegin) -> None:
        self._expire_parked()
        self.parked.pop(msg.request_id, None)
        self.incoming[msg.request_id] = Incoming(msg)
        if msg.n_chunks <= 0:
            self._copy_complete(msg.request_id)

    def _copy_chunk(self, msg: KvCopyChunk) -> None:
        inc = self.incoming.get(msg.request_id)
        if inc is None or inc.begin.migration_id != msg.migration_id or inc.begin.round != msg.round:
            return  # a copy given up on, or a late duplicate
        inc.chunks[msg.index] = msg.data
        # Chunks travel one path in order: the last one closes the copy, complete or not.
        if msg.index == inc.begin.n_chunks - 1 or len(inc.chunks) >= inc.begin.n_chunks:
            self._copy_complete(msg.request_id)

    def _copy_complete(self, request_id: str) -> None:
        assert self.engine is not None
        inc = self.incoming.pop(request_id)
        begin = inc.begin
        started = time.perf_counter()
        try:
            seq = Sequence(
                request_id=request_id, prompt_ids=list(begin.prompt_ids), generated_ids=list(begin.generated_ids),
                max_tokens=begin.max_tokens, temperature=begin.temperature, top_p=begin.top_p, seed=begin.seed,
                stop=list(begin.stop), text=begin.text_so_far,
            )
            layers = _decode_cache(begin, inc.chunks)
            self.engine.import_cache(seq, begin.n_cached, layers)
        except (ValueError, RuntimeError, TypeError) as exc:
            log.warning("%s: KV copy of %s refused: %s", self.name, request_id, exc)
            self._send(ResumeFailed(begin.migration_id, begin.round, request_id, begin.source_instance,
                                    str(exc), copy_failed=True), begin.source_node)
            return
        self.parked[request_id] = Parked(seq, begin.migration_id, begin.round)
        self._send(ResumeDone(begin.migration_id, begin.round, request_id, begin.source_instance,
                              len(seq.tokens), time.perf_counter() - started), begin.source_node)

    def _expire_parked(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, p in self.parked.items() if now - p.since > PARKED_TTL_S]:
            del self.parked[request_id]
        for request_id in [r for r, p in self.incoming.items() if now - p.since > PARKED_TTL_S]:
            del self.incoming[request_id]
        for request_id in [r for r, t in self.finished.items() if now - t > FINISHED_TTL_S]:
            del self.finished[request_id]

    def _cancel(self, request_id: str) -> None:
        self.waiting = deque(w for w in self.waiting if w.request_id != request_id)
        if self.running.pop(request_id, None) is not None:
            self._flush_copy(request_id)
            self._admit_waiting()
        self._publish()

    def _flush_copy(self, request_id: str) -> None:
        """The request left this instance: no more of its steps to pace a copy of its cache by. The rest goes
        now, so the destination answers and the migration settles ("finished at the source first")."""
        self._pump_copies(budget_s=float("inf"), only=request_id)

    # ------------------------------------------------------------------ decoding

    def _schedule_step(self) -> None:
        if not self.step_scheduled and self.running:
            self.step_scheduled = True
            self.actor_ref.tell(Step())

    def _step_all(self) -> None:
        assert self.engine is not None
        started = time.perf_counter()
        finished = False
        for seq in list(self.running.values()):
            finished |= self._step_one(seq)
        if any(out.chunks is not None for out in self.outgoing.values()):
            # A share of a step for KV copies: the stream slows a little instead of stopping.
            self._pump_copies(budget_s=max(COPY_SEND_MIN_S, COPY_SEND_SHARE * (time.perf_counter() - started)))
        if finished:
            self._admit_waiting()
            self._publish()
        self._schedule_step()

    def _step_one(self, seq: Sequence) -> bool:
        """One token of one request; True when that finished it."""
        assert self.engine is not None
        index = len(seq.generated_ids)
        token, delta = self.engine.step(seq)
        self._send(TokenChunk(seq.request_id, index, [token], delta))
        if seq.finish_reason:
            self._finish(seq, seq.finish_reason)
            return True
        return False

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


def _decode_cache(begin: KvCopyBegin, chunks: dict[int, bytes]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copied cache's layers from its chunks, checked: every chunk there, size, checksum, shapes."""
    missing = [i for i in range(begin.n_chunks) if i not in chunks]
    if missing:
        raise ValueError(f"short KV copy: {len(missing)} of {begin.n_chunks} chunks missing (first: {missing[0]})")
    data = bytearray().join(chunks[i] for i in range(begin.n_chunks))
    if len(data) != begin.total_bytes:
        raise ValueError(f"KV copy of {len(data)} bytes, {begin.total_bytes} announced")
    if crc32(data) != begin.crc32:
        raise ValueError("KV copy checksum mismatch")
    dtype = getattr(torch, begin.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"KV copy dtype {begin.dtype!r} is not a floating-point torch dtype")
    size = torch.empty((), dtype=dtype).element_size()
    layers = []
    offset = 0
    for index, pair in enumerate(begin.shapes):
        if len(pair) != 2:
            raise ValueError(f"KV copy layer {index}: expected [keys shape, values shape]")
        tensors = []
        for shape in pair:
            count = 1
            for dim in shape:
                if dim < 0:
                    raise ValueError(f"KV copy layer {index}: bad shape {shape}")
                count *= dim
            nbytes = count * size
            if offset + nbytes > len(data):
                raise ValueError(f"KV copy layer {index}: shape {shape} runs past the {len(data)} bytes sent")
            raw = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=offset) if nbytes else \
                torch.empty(0, dtype=torch.uint8)
            tensors.append(raw.view(dtype).reshape(shape))
            offset += nbytes
        layers.append((tensors[0], tensors[1]))
    if offset != len(data):
        raise ValueError(f"KV copy shapes cover {offset} of its {len(data)} bytes")
    return layers
