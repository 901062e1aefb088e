"""Live migration by tokens, the source side: hands a running request over to another instance.

:class:`MigrationSource`, for each request of a ``MigrateOut`` order:
  1. round 0 sends the destination either the request's KV cache (``KvCopyBegin`` + ``KvCopyChunk``s, a few
     chunks after each engine step) or its whole token log to recompute the cache from, whichever the cost
     model says is faster;
  2. each ``ResumeDone`` answers a round; while at least ``delta_tokens`` were generated meanwhile (and rounds
     are left), the next round sends just those tokens;
  3. then the hand-over: the request leaves this engine's batch, the router hears ``Migrated`` first, and the
     destination gets the last tokens (``ResumeRequest(final=True)``) and decodes on at once.
  A refused or lost KV copy falls back to recomputing; a round without an answer aborts the migration, and
  the request simply goes on here.

It is a state machine: every call takes the message and the engine and returns an :class:`~.outbox.Outbox` of
what to send, publish and arm, which the instance actor carries out.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import (
    KV_CHUNK_BYTES,
    KvCopyBegin,
    KvCopyChunk,
    Migrated,
    MigrateOut,
    MigrationEnded,
    ResumeDone,
    ResumeFailed,
    ResumeRequest,
)
from sllm_actors.migration.outbox import MigrationEngine, MigrationTimeout, Outbox
from sllm_actors.policy import placement
from sllm_actors.storage.format import crc32

log = logging.getLogger(__name__)

ROUND_TIMEOUT_S = 30.0
"""A round waits this long for its ResumeDone; then the migration aborts and the source goes on."""
COPY_TIMEOUT_MIN_S = 10.0
"""A KV copy waits at least this long (or 10x its estimate) for its ResumeDone, then recomputes instead."""
COPY_SEND_SHARE = 0.25
"""Time spent sending KV-copy chunks after an engine step, as a share of that step's time."""
COPY_SEND_MIN_S = 0.005
FAULT_ENV = "SLLM_FAULT_KV_COPY"
"""Fault injection for tests: ``corrupt`` flips a byte of every KV copy after its checksum, ``short``
cuts its last chunk in half. The destination must refuse the copy and the source recompute instead."""


class CacheChunks:
    """A KV cache's bytes, layer after layer, as ``chunk_bytes`` pieces cut one at a time from byte views of
    the exported tensors: no join of the whole cache is ever made.

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
    """One request of a migration order."""

    migration_id: str
    dest_node: str
    dest_instance: str
    delta_tokens: int
    max_rounds: int
    started: float
    round: int = 0
    sent_upto: int = 0
    tokens_recomputed: int = 0
    transfer: str = "recompute"
    kv_bytes: int = 0
    copy_pending: bool = False
    """A KV copy is round ``round``, not yet answered."""
    copy_started: float = 0.0
    copy_s: float = 0.0
    copy_rebuild_s: float = 0.0
    note: str = ""
    chunks: CacheChunks | None = None
    """A KV copy's chunks not sent yet (sent a few per engine step)."""
    copy_estimate_s: float = 0.0


class MigrationSource:
    """The source side of one instance: its requests being migrated away, round by round.

    ``instance_id`` and ``node_name`` say where the messages come from; ``name`` labels the log lines;
    ``clock`` (seconds, monotonic) times the rounds and paces the KV copies.
    """

    def __init__(self, instance_id: str, node_name: str, *, name: str = "",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.instance_id = instance_id
        self.node_name = node_name
        self.name = name or instance_id
        self.clock = clock
        self.outgoing: dict[str, Outgoing] = {}
        """request id -> its migration state."""
        self.orders: dict[str, set[str]] = {}
        """migration id -> request ids not yet handed over."""
        self.notes: dict[str, list[str]] = {}
        self.prefill_cost = placement.MigrationCost()
        """This instance's own prefills (tokens, seconds): what recomputing a cache costs on this model and
        device, for the copy-or-recompute choice before the scheduler has fitted real migrations."""

    def busy(self) -> bool:
        return bool(self.outgoing)

    def copies_pending(self) -> bool:
        return any(out.chunks is not None for out in self.outgoing.values())

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill timed on this instance (as a migration's destination): a sample of the recompute cost."""
        self.prefill_cost.observe(tokens, seconds)

    def migrate_out(self, msg: MigrateOut, engine: MigrationEngine) -> Outbox:
        outbox = Outbox()
        pending: set[str] = set()
        for request_id in msg.request_ids:
            seq = engine.get(request_id)
            if seq is None or request_id in self.outgoing:
                continue  # finished already, or in another migration
            if seq.num_cached == 0:
                # Not started here (or preempted): no cache to move, the router simply starts it there.
                engine.remove(request_id)
                outbox.send(Migrated(msg.migration_id, request_id, self.instance_id, msg.dest_node, msg.dest_instance,
                                     len(seq.generated_ids), 0, 0, 0.0))
                continue
            out = Outgoing(msg.migration_id, msg.dest_node, msg.dest_instance, msg.delta_tokens, msg.max_rounds,
                           started=self.clock())
            self.outgoing[request_id] = out
            pending.add(request_id)
            self._first_round(seq, out, msg, engine, outbox)
        if pending:
            self.orders[msg.migration_id] = pending
            outbox.publish()
        else:
            outbox.send(MigrationEnded(msg.migration_id, self.instance_id, "done", "nothing left to migrate"))
        return outbox

    def _first_round(self, seq: Sequence, out: Outgoing, msg: MigrateOut, engine: MigrationEngine,
                     outbox: Outbox) -> None:
        """Round 0: the KV cache itself or the tokens to recompute it from, whichever the cost model picks."""
        kv_bytes = seq.num_cached * engine.kv_bytes_per_token
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
                self._send_copy(seq, out, choice.copy_s, engine, outbox)
                return
            except (ValueError, RuntimeError, TypeError) as exc:
                log.warning("%s: cannot copy the KV cache of %s (%s); recomputing", self.name, seq.request_id, exc)
                out.note = f"KV copy not possible ({exc}); recomputed from the tokens"
        self._send_round(seq, out, list(seq.prompt_ids), list(seq.generated_ids), outbox)

    def _send_copy(self, seq: Sequence, out: Outgoing, estimate_s: float, engine: MigrationEngine,
                   outbox: Outbox) -> None:
        """Send the request's KV cache to the destination: its layers' bytes in chunks, with a checksum.

        The chunks are cut one at a time and sent a few after each engine step (:meth:`pump`), never all at
        once: this runs on the instance's thread, so a whole 4k-token cache serialized here in one go was a late
        token for every client of the batch.
        """
        started = self.clock()
        n_cached, layers = engine.export_cache(seq)
        dtype = layers[0][0].dtype
        shapes = [[list(keys.shape), list(values.shape)] for keys, values in layers]
        chunks = CacheChunks([t for pair in layers for t in pair], KV_CHUNK_BYTES, os.environ.get(FAULT_ENV, ""))
        out.transfer, out.kv_bytes, out.copy_pending, out.copy_started = "copy", chunks.total, True, started
        out.sent_upto = len(seq.generated_ids)
        out.chunks, out.copy_estimate_s = chunks, estimate_s
        outbox.send(KvCopyBegin(
            migration_id=out.migration_id, round=out.round, request_id=seq.request_id, instance_id=out.dest_instance,
            source_node=self.node_name, source_instance=self.instance_id, prompt_ids=list(seq.prompt_ids),
            generated_ids=list(seq.generated_ids), **seq.sampling.fields(), text_so_far=seq.text, n_cached=n_cached,
            dtype=str(dtype).removeprefix("torch."), shapes=shapes, total_bytes=chunks.total, crc32=chunks.crc32(),
            n_chunks=chunks.count, cache_salt=seq.cache_salt,
        ), out.dest_node)
        self._pump(COPY_SEND_MIN_S, "", outbox)

    def pump(self, budget_s: float, only: str = "") -> Outbox:
        """The next chunks of every KV copy under way, for about ``budget_s`` (at least one chunk each;
        ``budget_s`` of infinity sends the rest). ``only``: just that request's copy."""
        outbox = Outbox()
        self._pump(budget_s, only, outbox)
        return outbox

    def _pump(self, budget_s: float, only: str, outbox: Outbox) -> None:
        deadline = self.clock() + budget_s
        for request_id, out in list(self.outgoing.items()):
            chunks = out.chunks
            if chunks is None or (only and request_id != only):
                continue
            while not chunks.done():
                index = chunks.sent
                outbox.send(KvCopyChunk(out.migration_id, out.round, request_id, out.dest_instance, index,
                                        chunks.take()), out.dest_node)
                if self.clock() >= deadline:
                    break
            if chunks.done():
                out.chunks = None
                self._arm_timer(request_id, out, max(COPY_TIMEOUT_MIN_S, 10 * out.copy_estimate_s), outbox)

    def flush(self, request_id: str) -> Outbox:
        """The request left this instance: no more of its steps to pace a copy of its cache by. The rest goes
        now, so the destination answers and the migration settles ("finished at the source first")."""
        return self.pump(budget_s=float("inf"), only=request_id)

    def resume_failed(self, msg: ResumeFailed, engine: MigrationEngine) -> Outbox:
        outbox = Outbox()
        out = self.outgoing.get(msg.request_id)
        if msg.copy_failed:
            if out is not None and out.migration_id == msg.migration_id and out.round == msg.round \
                    and out.copy_pending:
                self._copy_fallback(msg.request_id, out, msg.message, engine, outbox)
        else:
            self._abort(msg.migration_id, f"destination failed: {msg.message}", outbox)
        return outbox

    def timed_out(self, msg: MigrationTimeout, engine: MigrationEngine) -> Outbox:
        outbox = Outbox()
        out = self.outgoing.get(msg.request_id)
        if out is not None and out.migration_id == msg.migration_id and out.round == msg.round:
            if out.copy_pending:
                self._copy_fallback(msg.request_id, out, "no answer in time", engine, outbox)
            else:
                self._abort(msg.migration_id, f"round {msg.round} got no answer in {ROUND_TIMEOUT_S:.0f}s", outbox)
        return outbox

    def _copy_fallback(self, request_id: str, out: Outgoing, reason: str, engine: MigrationEngine,
                       outbox: Outbox) -> None:
        """The copy was refused or lost: recompute from the tokens instead, in the next round."""
        out.copy_pending = False
        out.chunks = None
        out.transfer = "recompute"
        out.note = f"KV copy failed ({reason}); recomputed from the tokens"
        log.warning("%s: %s: %s", self.name, request_id, out.note)
        outbox.event("migrate", f"{request_id}: {out.note}", {"request_id": request_id})
        seq = engine.get(request_id)
        if seq is None:
            self._settle(request_id, out, outbox, f"{request_id} finished at the source first")
            return
        out.round += 1
        out.max_rounds += 1
        self._send_round(seq, out, list(seq.prompt_ids), list(seq.generated_ids), outbox)

    def _send_round(self, seq: Sequence, out: Outgoing, prompt_ids: list[int], new_ids: list[int],
                    outbox: Outbox) -> None:
        out.sent_upto = len(seq.generated_ids)
        out.tokens_recomputed += len(prompt_ids) + len(new_ids)
        outbox.send(self._resume_message(seq, out, prompt_ids, new_ids), out.dest_node)
        self._arm_timer(seq.request_id, out, ROUND_TIMEOUT_S, outbox)

    def _resume_message(self, seq: Sequence, out: Outgoing, prompt_ids: list[int], new_ids: list[int],
                        final: bool = False) -> ResumeRequest:
        return ResumeRequest(
            migration_id=out.migration_id, round=out.round, request_id=seq.request_id,
            instance_id=out.dest_instance, source_node=self.node_name, source_instance=self.instance_id,
            prompt_ids=prompt_ids, generated_ids=new_ids, **seq.sampling.fields(), text_so_far=seq.text,
            final=final, cache_salt=seq.cache_salt,
        )

    @staticmethod
    def _arm_timer(request_id: str, out: Outgoing, seconds: float, outbox: Outbox) -> None:
        outbox.arm_timer(seconds, MigrationTimeout(out.migration_id, request_id, out.round))

    def round_done(self, msg: ResumeDone, engine: MigrationEngine) -> Outbox:
        outbox = Outbox()
        out = self.outgoing.get(msg.request_id)
        if out is None or out.migration_id != msg.migration_id or out.round != msg.round:
            return outbox  # late or repeated: that round is settled
        if out.copy_pending:
            out.copy_pending = False
            out.copy_s = self.clock() - out.copy_started
            out.copy_rebuild_s = msg.recompute_s
        seq = engine.get(msg.request_id)
        if seq is None:
            # It finished here while the destination recomputed: nothing to hand over.
            self._settle(msg.request_id, out, outbox, f"{msg.request_id} finished at the source first")
            return outbox
        new_ids = seq.generated_ids[out.sent_upto :]
        if len(new_ids) >= out.delta_tokens and out.round + 1 < out.max_rounds:
            out.round += 1
            self._send_round(seq, out, [], new_ids, outbox)
            return outbox
        # Few enough tokens left: stop here. The router learns first (it re-routes, and its StartInference
        # is the safety net); the destination gets the last tokens straight from here and starts decoding
        # without waiting for the router. Both go on this one socket, so the router sees Migrated before
        # any token of the destination. The rest of the batch goes on.
        engine.remove(msg.request_id)
        rounds = out.round + 1
        outbox.send(Migrated(
            out.migration_id, msg.request_id, self.instance_id, out.dest_node, out.dest_instance,
            len(seq.generated_ids), rounds, out.tokens_recomputed + len(new_ids), self.clock() - out.started,
            out.transfer, out.kv_bytes, out.copy_s, out.note, out.copy_rebuild_s,
        ))
        out.round += 1
        outbox.send(self._resume_message(seq, out, [], list(new_ids), final=True), out.dest_node)
        how = (f"KV cache copied ({out.kv_bytes / 1e6:.1f} MB in {out.copy_s:.2f}s)" if out.transfer == "copy"
               else f"{out.tokens_recomputed} tokens recomputed")
        outbox.event("migrate", f"{msg.request_id} migrated to {out.dest_node}/{out.dest_instance} after "
                     f"{rounds} round(s), {how}",
                     {"request_id": msg.request_id, "transfer": out.transfer, "kv_bytes": out.kv_bytes,
                      "copy_s": out.copy_s, "note": out.note})
        self._settle(msg.request_id, out, outbox)
        outbox.publish()
        return outbox

    def _settle(self, request_id: str, out: Outgoing, outbox: Outbox, note: str = "") -> None:
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
            outbox.send(MigrationEnded(out.migration_id, self.instance_id, "done", detail))

    def abort(self, migration_id: str, reason: str) -> Outbox:
        """Give the migration up (the controller's order, or the destination failed): generation goes on here."""
        outbox = Outbox()
        self._abort(migration_id, reason, outbox)
        return outbox

    def _abort(self, migration_id: str, reason: str, outbox: Outbox) -> None:
        pending = self.orders.pop(migration_id, None)
        if pending is None:
            return
        self.notes.pop(migration_id, None)
        for request_id in pending:
            self.outgoing.pop(request_id, None)
        log.warning("%s: migration %s aborted: %s; generation goes on here", self.name, migration_id, reason)
        outbox.event("migrate", f"migration {migration_id} aborted: {reason}", {"migration_id": migration_id})
        outbox.send(MigrationEnded(migration_id, self.instance_id, "aborted", reason))
        outbox.publish()


__all__ = ["COPY_SEND_MIN_S", "COPY_SEND_SHARE", "COPY_TIMEOUT_MIN_S", "FAULT_ENV", "ROUND_TIMEOUT_S", "CacheChunks",
           "MigrationSource", "Outgoing"]
