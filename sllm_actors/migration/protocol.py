"""Live migration by tokens, as the instance actor runs it: the protocol's source and destination sides.

Source (:class:`MigrationSource`), for each request of a ``MigrateOut`` order:
  1. round 0 sends the destination either the request's KV cache (``KvCopyBegin`` + ``KvCopyChunk``s, a few
     chunks after each engine step) or its whole token log to recompute the cache from, whichever the cost
     model says is faster;
  2. each ``ResumeDone`` answers a round; while at least ``delta_tokens`` were generated meanwhile (and rounds
     are left), the next round sends just those tokens;
  3. then the hand-over: the request leaves this engine's batch, the router hears ``Migrated`` first, and the
     destination gets the last tokens (``ResumeRequest(final=True)``) and decodes on at once.
  A refused or lost KV copy falls back to recomputing; a round without an answer aborts the migration, and
  the request simply goes on here.

Destination (:class:`MigrationDestination`): builds the cache in rounds (prefill, then extends) or from a
copy, parks it, and on the hand-over (or the router's ``StartInference``) feeds the last tokens, emits the
next token at once and puts the request into its engine's batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sllm_actors.policy import placement
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
    StartInference,
)
from sllm_actors.storage.format import crc32

if TYPE_CHECKING:
    from sllm_actors.actors.node.instance import ModelInstanceActor

log = logging.getLogger(__name__)

ROUND_TIMEOUT_S = 30.0
"""A round waits this long for its ResumeDone; then the migration aborts and the source goes on."""
PARKED_TTL_S = 120.0
"""A recomputed cache nobody continued (its source died, say) is dropped after this long."""
COPY_TIMEOUT_MIN_S = 10.0
"""A KV copy waits at least this long (or 10x its estimate) for its ResumeDone, then recomputes instead."""
COPY_SEND_SHARE = 0.25
"""Time spent sending KV-copy chunks after an engine step, as a share of that step's time."""
COPY_SEND_MIN_S = 0.005
FAULT_ENV = "SLLM_FAULT_KV_COPY"
"""Fault injection for tests: ``corrupt`` flips a byte of every KV copy after its checksum, ``short``
cuts its last chunk in half. The destination must refuse the copy and the source recompute instead."""


@dataclass(frozen=True)
class MigrationTimeout:
    """In-process: a migration round got no answer in time."""

    migration_id: str
    request_id: str
    round: int


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
    """A KV copy's chunks not sent yet (sent a few per engine step)."""
    copy_estimate_s: float = 0.0


@dataclass
class Incoming:
    """Destination side: a KV copy whose chunks are arriving."""

    begin: KvCopyBegin
    chunks: dict[int, bytes] = field(default_factory=dict)
    since: float = field(default_factory=time.monotonic)


@dataclass
class Parked:
    """Destination side: a rebuilt cache waiting for the hand-over (or the router) to continue it here."""

    seq: Sequence
    migration_id: str
    round: int
    since: float = field(default_factory=time.monotonic)


def sequence_of(msg: ResumeRequest | KvCopyBegin | StartInference) -> Sequence:
    """A request's decoding state from any message that carries its whole log and sampling parameters."""
    return Sequence(request_id=msg.request_id, prompt_ids=list(msg.prompt_ids), generated_ids=list(msg.generated_ids),
                    sampling=msg.sampling, text=msg.text_so_far)


class MigrationSource:
    def __init__(self, host: ModelInstanceActor) -> None:
        self.host = host
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

    def migrate_out(self, msg: MigrateOut) -> None:
        host = self.host
        engine = host.engine
        assert engine is not None
        pending: set[str] = set()
        for request_id in msg.request_ids:
            seq = engine.get(request_id)
            if seq is None or request_id in self.outgoing:
                continue  # finished already, or in another migration
            if seq.num_cached == 0:
                # Not started here (or preempted): no cache to move, the router simply starts it there.
                engine.remove(request_id)
                host.send(Migrated(msg.migration_id, request_id, host.instance_id, msg.dest_node, msg.dest_instance,
                                   len(seq.generated_ids), 0, 0, 0.0))
                continue
            out = Outgoing(msg.migration_id, msg.dest_node, msg.dest_instance, msg.delta_tokens, msg.max_rounds)
            self.outgoing[request_id] = out
            pending.add(request_id)
            self._first_round(seq, out, msg)
        if pending:
            self.orders[msg.migration_id] = pending
            host.publish()
        else:
            host.send(MigrationEnded(msg.migration_id, host.instance_id, "done", "nothing left to migrate"))

    def _first_round(self, seq: Sequence, out: Outgoing, msg: MigrateOut) -> None:
        """Round 0: the KV cache itself or the tokens to recompute it from, whichever the cost model picks."""
        engine = self.host.engine
        assert engine is not None
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
                self._send_copy(seq, out, choice.copy_s)
                return
            except (ValueError, RuntimeError, TypeError) as exc:
                log.warning("%s: cannot copy the KV cache of %s (%s); recomputing", self.host.name, seq.request_id,
                            exc)
                out.note = f"KV copy not possible ({exc}); recomputed from the tokens"
        self._send_round(seq, out, list(seq.prompt_ids), list(seq.generated_ids))

    def _send_copy(self, seq: Sequence, out: Outgoing, estimate_s: float) -> None:
        """Send the request's KV cache to the destination: its layers' bytes in chunks, with a checksum.

        The chunks are cut one at a time and sent a few after each engine step (:meth:`pump`), never all at
        once: this runs on the instance's thread, so a whole 4k-token cache serialized here in one go was a late
        token for every client of the batch.
        """
        host = self.host
        assert host.engine is not None
        started = time.perf_counter()
        n_cached, layers = host.engine.export_cache(seq)
        dtype = layers[0][0].dtype
        shapes = [[list(keys.shape), list(values.shape)] for keys, values in layers]
        chunks = CacheChunks([t for pair in layers for t in pair], KV_CHUNK_BYTES, os.environ.get(FAULT_ENV, ""))
        out.transfer, out.kv_bytes, out.copy_pending, out.copy_started = "copy", chunks.total, True, started
        out.sent_upto = len(seq.generated_ids)
        out.chunks, out.copy_estimate_s = chunks, estimate_s
        host.send(KvCopyBegin(
            migration_id=out.migration_id, round=out.round, request_id=seq.request_id, instance_id=out.dest_instance,
            source_node=host.node.name, source_instance=host.instance_id, prompt_ids=list(seq.prompt_ids),
            generated_ids=list(seq.generated_ids), **seq.sampling.fields(), text_so_far=seq.text, n_cached=n_cached,
            dtype=str(dtype).removeprefix("torch."), shapes=shapes, total_bytes=chunks.total, crc32=chunks.crc32(),
            n_chunks=chunks.count,
        ), out.dest_node)
        self.pump(budget_s=COPY_SEND_MIN_S)

    def pump(self, budget_s: float, only: str = "") -> None:
        """Send the next chunks of every KV copy under way, for about ``budget_s`` (at least one chunk each;
        ``budget_s`` of infinity sends the rest). ``only``: just that request's copy."""
        deadline = time.perf_counter() + budget_s
        for request_id, out in list(self.outgoing.items()):
            chunks = out.chunks
            if chunks is None or (only and request_id != only):
                continue
            while not chunks.done():
                index = chunks.sent
                self.host.send(KvCopyChunk(out.migration_id, out.round, request_id, out.dest_instance, index,
                                           chunks.take()), out.dest_node)
                if time.perf_counter() >= deadline:
                    break
            if chunks.done():
                out.chunks = None
                self._arm_timer(request_id, out, max(COPY_TIMEOUT_MIN_S, 10 * out.copy_estimate_s))

    def flush(self, request_id: str) -> None:
        """The request left this instance: no more of its steps to pace a copy of its cache by. The rest goes
        now, so the destination answers and the migration settles ("finished at the source first")."""
        self.pump(budget_s=float("inf"), only=request_id)

    def resume_failed(self, msg: ResumeFailed) -> None:
        out = self.outgoing.get(msg.request_id)
        if msg.copy_failed:
            if out is not None and out.migration_id == msg.migration_id and out.round == msg.round \
                    and out.copy_pending:
                self._copy_fallback(msg.request_id, out, msg.message)
        else:
            self.abort(msg.migration_id, f"destination failed: {msg.message}")

    def timed_out(self, msg: MigrationTimeout) -> None:
        out = self.outgoing.get(msg.request_id)
        if out is not None and out.migration_id == msg.migration_id and out.round == msg.round:
            if out.copy_pending:
                self._copy_fallback(msg.request_id, out, "no answer in time")
            else:
                self.abort(msg.migration_id, f"round {msg.round} got no answer in {ROUND_TIMEOUT_S:.0f}s")

    def _copy_fallback(self, request_id: str, out: Outgoing, reason: str) -> None:
        """The copy was refused or lost: recompute from the tokens instead, in the next round."""
        out.copy_pending = False
        out.chunks = None
        out.transfer = "recompute"
        out.note = f"KV copy failed ({reason}); recomputed from the tokens"
        log.warning("%s: %s: %s", self.host.name, request_id, out.note)
        self.host.node.event("migrate", f"{request_id}: {out.note}", {"request_id": request_id})
        seq = self._running(request_id)
        if seq is None:
            self._settle(request_id, out, f"{request_id} finished at the source first")
            return
        out.round += 1
        out.max_rounds += 1
        self._send_round(seq, out, list(seq.prompt_ids), list(seq.generated_ids))

    def _running(self, request_id: str) -> Sequence | None:
        engine = self.host.engine
        return engine.get(request_id) if engine is not None else None

    def _send_round(self, seq: Sequence, out: Outgoing, prompt_ids: list[int], new_ids: list[int]) -> None:
        out.sent_upto = len(seq.generated_ids)
        out.tokens_recomputed += len(prompt_ids) + len(new_ids)
        self.host.send(self._resume_message(seq, out, prompt_ids, new_ids), out.dest_node)
        self._arm_timer(seq.request_id, out, ROUND_TIMEOUT_S)

    def _resume_message(self, seq: Sequence, out: Outgoing, prompt_ids: list[int], new_ids: list[int],
                        final: bool = False) -> ResumeRequest:
        return ResumeRequest(
            migration_id=out.migration_id, round=out.round, request_id=seq.request_id,
            instance_id=out.dest_instance, source_node=self.host.node.name, source_instance=self.host.instance_id,
            prompt_ids=prompt_ids, generated_ids=new_ids, **seq.sampling.fields(), text_so_far=seq.text,
            final=final,
        )

    def _arm_timer(self, request_id: str, out: Outgoing, seconds: float) -> None:
        timeout = MigrationTimeout(out.migration_id, request_id, out.round)
        timer = threading.Timer(seconds, self.host.tell_quietly, args=(timeout,))
        timer.daemon = True
        timer.start()

    def round_done(self, msg: ResumeDone) -> None:
        host = self.host
        out = self.outgoing.get(msg.request_id)
        if out is None or out.migration_id != msg.migration_id or out.round != msg.round:
            return  # late or repeated: that round is settled
        if out.copy_pending:
            out.copy_pending = False
            out.copy_s = time.perf_counter() - out.copy_started
            out.copy_rebuild_s = msg.recompute_s
        seq = self._running(msg.request_id)
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
        # any token of the destination. The rest of the batch goes on.
        assert host.engine is not None
        host.engine.remove(msg.request_id)
        rounds = out.round + 1
        host.send(Migrated(
            out.migration_id, msg.request_id, host.instance_id, out.dest_node, out.dest_instance,
            len(seq.generated_ids), rounds, out.tokens_recomputed + len(new_ids), time.perf_counter() - out.started,
            out.transfer, out.kv_bytes, out.copy_s, out.note, out.copy_rebuild_s,
        ))
        out.round += 1
        host.send(self._resume_message(seq, out, [], list(new_ids), final=True), out.dest_node)
        how = (f"KV cache copied ({out.kv_bytes / 1e6:.1f} MB in {out.copy_s:.2f}s)" if out.transfer == "copy"
               else f"{out.tokens_recomputed} tokens recomputed")
        host.node.event("migrate", f"{msg.request_id} migrated to {out.dest_node}/{out.dest_instance} after "
                        f"{rounds} round(s), {how}",
                        {"request_id": msg.request_id, "transfer": out.transfer, "kv_bytes": out.kv_bytes,
                         "copy_s": out.copy_s, "note": out.note})
        self._settle(msg.request_id, out)
        host.publish()

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
            self.host.send(MigrationEnded(out.migration_id, self.host.instance_id, "done", detail))

    def abort(self, migration_id: str, reason: str) -> None:
        pending = self.orders.pop(migration_id, None)
        if pending is None:
            return
        self.notes.pop(migration_id, None)
        for request_id in pending:
            self.outgoing.pop(request_id, None)
        log.warning("%s: migration %s aborted: %s; generation goes on here", self.host.name, migration_id, reason)
        self.host.node.event("migrate", f"migration {migration_id} aborted: {reason}", {"migration_id": migration_id})
        self.host.send(MigrationEnded(migration_id, self.host.instance_id, "aborted", reason))
        self.host.publish()


class MigrationDestination:
    def __init__(self, host: ModelInstanceActor) -> None:
        self.host = host
        self.parked: dict[str, Parked] = {}
        self.incoming: dict[str, Incoming] = {}
        """request id -> a KV copy being received."""

    def resume_in(self, msg: ResumeRequest) -> None:
        host = self.host
        engine = host.engine
        assert engine is not None
        self.expire()
        if msg.final:
            self._handover(msg)
            return
        started = time.perf_counter()
        try:
            if msg.prompt_ids:
                # The whole log (round 0, or a recompute after a refused KV copy): a fresh cache.
                self.incoming.pop(msg.request_id, None)
                self._drop(msg.request_id)
                seq = sequence_of(msg)
                host.source_side.prefill_cost.observe(len(seq.tokens), engine.prefill(seq))
                self.parked[msg.request_id] = Parked(seq, msg.migration_id, msg.round)
            else:
                parked = self._parked_for(msg.request_id, msg.migration_id, msg.round)
                if parked is None:
                    raise ValueError(f"round {msg.round} of {msg.migration_id} does not follow what is here")
                engine.extend(parked.seq, list(msg.generated_ids))
                parked.round = msg.round
                parked.since = time.monotonic()
        except (ValueError, RuntimeError) as exc:
            host.send(ResumeFailed(msg.migration_id, msg.round, msg.request_id, msg.source_instance, str(exc)),
                      msg.source_node)
            return
        n_tokens = len(msg.prompt_ids) + len(msg.generated_ids)
        host.send(ResumeDone(msg.migration_id, msg.round, msg.request_id, msg.source_instance, n_tokens,
                             time.perf_counter() - started), msg.source_node)

    def _parked_for(self, request_id: str, migration_id: str, round_: int) -> Parked | None:
        parked = self.parked.get(request_id)
        if parked is None or parked.migration_id != migration_id or parked.round != round_ - 1:
            return None
        return parked

    def _handover(self, msg: ResumeRequest) -> None:
        """The source stopped: feed its last tokens and decode from here at once."""
        host = self.host
        assert host.engine is not None
        request_id = msg.request_id
        if host.engine.get(request_id) is not None or request_id in host.finished:
            return  # the router's StartInference came first and continued it
        parked = self._parked_for(request_id, msg.migration_id, msg.round)
        if parked is None:
            # Nothing to continue from: the router's StartInference (on its way) rebuilds from the log.
            log.warning("%s: hand-over of %s (%s round %d) does not follow what is here", host.name, request_id,
                        msg.migration_id, msg.round)
            return
        try:
            host.engine.extend(parked.seq, list(msg.generated_ids))
        except (ValueError, RuntimeError) as exc:
            log.warning("%s: hand-over of %s failed (%s); the router's StartInference restarts it", host.name,
                        request_id, exc)
            self._drop(request_id)
            return
        del self.parked[request_id]
        parked.seq.text = msg.text_so_far
        host.run_now(parked.seq)

    def continue_parked(self, msg: StartInference) -> bool:
        """The router's StartInference for a request whose cache was rebuilt here: only the last few tokens are
        new. False when there is nothing usable (the caller starts it from its log)."""
        host = self.host
        assert host.engine is not None
        parked = self.parked.pop(msg.request_id, None)
        if parked is None or not msg.prompt_ids:
            return False
        seq = parked.seq
        have = seq.tokens
        log_ids = list(msg.prompt_ids) + list(msg.generated_ids)
        if log_ids[: len(have)] != have or seq.prompt_ids != list(msg.prompt_ids):
            log.warning("%s: parked cache of %s does not match the log; recomputing", host.name, msg.request_id)
            host.engine.release(seq)
            return False
        try:
            host.engine.extend(seq, log_ids[len(have):])
        except (ValueError, RuntimeError) as exc:
            log.warning("%s: parked cache of %s could not catch up (%s); recomputing", host.name, msg.request_id, exc)
            host.engine.release(seq)
            return False
        seq.text = msg.text_so_far
        host.run_now(seq)
        return True

    def copy_begin(self, msg: KvCopyBegin) -> None:
        self.expire()
        self._drop(msg.request_id)
        self.incoming[msg.request_id] = Incoming(msg)
        if msg.n_chunks <= 0:
            self._copy_complete(msg.request_id)

    def copy_chunk(self, msg: KvCopyChunk) -> None:
        inc = self.incoming.get(msg.request_id)
        if inc is None or inc.begin.migration_id != msg.migration_id or inc.begin.round != msg.round:
            return  # a copy given up on, or a late duplicate
        inc.chunks[msg.index] = msg.data
        # Chunks travel one path in order: the last one closes the copy, complete or not.
        if msg.index == inc.begin.n_chunks - 1 or len(inc.chunks) >= inc.begin.n_chunks:
            self._copy_complete(msg.request_id)

    def _copy_complete(self, request_id: str) -> None:
        host = self.host
        assert host.engine is not None
        inc = self.incoming.pop(request_id)
        begin = inc.begin
        started = time.perf_counter()
        seq = sequence_of(begin)
        try:
            layers = decode_cache(begin, inc.chunks)
            host.engine.import_cache(seq, begin.n_cached, layers)
        except (ValueError, RuntimeError, TypeError) as exc:
            host.engine.release(seq)
            log.warning("%s: KV copy of %s refused: %s", host.name, request_id, exc)
            host.send(ResumeFailed(begin.migration_id, begin.round, request_id, begin.source_instance,
                                   str(exc), copy_failed=True), begin.source_node)
            return
        self.parked[request_id] = Parked(seq, begin.migration_id, begin.round)
        host.send(ResumeDone(begin.migration_id, begin.round, request_id, begin.source_instance,
                             len(seq.tokens), time.perf_counter() - started), begin.source_node)

    def _drop(self, request_id: str) -> None:
        parked = self.parked.pop(request_id, None)
        if parked is not None and self.host.engine is not None:
            self.host.engine.release(parked.seq)

    def expire(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, p in self.parked.items() if now - p.since > PARKED_TTL_S]:
            self._drop(request_id)
        for request_id in [r for r, p in self.incoming.items() if now - p.since > PARKED_TTL_S]:
            del self.incoming[request_id]


def decode_cache(begin: KvCopyBegin, chunks: dict[int, bytes]) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


__all__ = ["CacheChunks", "MigrationDestination", "MigrationSource", "MigrationTimeout", "decode_cache"]
