"""Live migration by tokens, the destination side: rebuilds a request's cache and takes the request over.

:class:`MigrationDestination` builds the cache in rounds (``ResumeRequest``: prefill, then extends) or from a
copy (``KvCopyBegin`` + ``KvCopyChunk``s, checked by :func:`decode_cache`), parks it, and on the hand-over
(``ResumeRequest(final=True)``, or the router's ``StartInference``) feeds the last tokens and gives the request
back to its host to emit the next token at once and join the engine's batch.

It is a state machine: every call takes the message and the engine and returns an :class:`~.outbox.Outbox` of
what to send and run, which the instance actor carries out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field

import torch

from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import (
    KvCopyBegin,
    KvCopyChunk,
    ResumeDone,
    ResumeFailed,
    ResumeRequest,
    StartInference,
)
from sllm_actors.migration.outbox import MigrationEngine, Outbox
from sllm_actors.storage.format import crc32

log = logging.getLogger(__name__)

PARKED_TTL_S = 120.0
"""A recomputed cache nobody continued (its source died, say) is dropped after this long."""


@dataclass
class Incoming:
    """A KV copy whose chunks are arriving."""

    begin: KvCopyBegin
    since: float
    chunks: dict[int, bytes] = field(default_factory=dict)


@dataclass
class Parked:
    """A rebuilt cache waiting for the hand-over (or the router) to continue it here."""

    seq: Sequence
    migration_id: str
    round: int
    since: float


def sequence_of(msg: ResumeRequest | KvCopyBegin | StartInference) -> Sequence:
    """A request's decoding state from any message that carries its whole log and sampling parameters."""
    return Sequence(request_id=msg.request_id, prompt_ids=list(msg.prompt_ids), generated_ids=list(msg.generated_ids),
                    sampling=msg.sampling, text=msg.text_so_far, cache_salt=msg.cache_salt)


class MigrationDestination:
    """The destination side of one instance: caches being rebuilt or copied here, and those parked.

    ``name`` labels the log lines; ``clock`` (seconds, monotonic) times the rebuilds and the parked caches' age.
    """

    def __init__(self, *, name: str = "", clock: Callable[[], float] = time.perf_counter) -> None:
        self.name = name
        self.clock = clock
        self.parked: dict[str, Parked] = {}
        self.incoming: dict[str, Incoming] = {}
        """request id -> a KV copy being received."""

    def resume_in(self, msg: ResumeRequest, engine: MigrationEngine, finished_here: Container[str] = ()) -> Outbox:
        """A round of tokens (or, ``final``, the hand-over). ``finished_here``: requests this instance already
        finished, which a late hand-over must not restart."""
        outbox = Outbox()
        self.expire(engine)
        if msg.final:
            self._handover(msg, engine, finished_here, outbox)
            return outbox
        started = self.clock()
        try:
            if msg.prompt_ids:
                # The whole log (round 0, or a recompute after a refused KV copy): a fresh cache.
                self.incoming.pop(msg.request_id, None)
                self._drop(msg.request_id, engine)
                seq = sequence_of(msg)
                outbox.prefill_timed(len(seq.tokens), engine.prefill(seq))
                self.parked[msg.request_id] = Parked(seq, msg.migration_id, msg.round, self.clock())
            else:
                parked = self._parked_for(msg.request_id, msg.migration_id, msg.round)
                if parked is None:
                    raise ValueError(f"round {msg.round} of {msg.migration_id} does not follow what is here")
                engine.extend(parked.seq, list(msg.generated_ids))
                parked.round = msg.round
                parked.since = self.clock()
        except (ValueError, RuntimeError) as exc:
            outbox.send(ResumeFailed(msg.migration_id, msg.round, msg.request_id, msg.source_instance, str(exc)),
                        msg.source_node)
            return outbox
        n_tokens = len(msg.prompt_ids) + len(msg.generated_ids)
        outbox.send(ResumeDone(msg.migration_id, msg.round, msg.request_id, msg.source_instance, n_tokens,
                               self.clock() - started), msg.source_node)
        return outbox

    def _parked_for(self, request_id: str, migration_id: str, round_: int) -> Parked | None:
        parked = self.parked.get(request_id)
        if parked is None or parked.migration_id != migration_id or parked.round != round_ - 1:
            return None
        return parked

    def _handover(self, msg: ResumeRequest, engine: MigrationEngine, finished_here: Container[str],
                  outbox: Outbox) -> None:
        """The source stopped: feed its last tokens and decode from here at once."""
        request_id = msg.request_id
        if engine.get(request_id) is not None or request_id in finished_here:
            return  # the router's StartInference came first and continued it
        parked = self._parked_for(request_id, msg.migration_id, msg.round)
        if parked is None:
            # Nothing to continue from: the router's StartInference (on its way) rebuilds from the log.
            log.warning("%s: hand-over of %s (%s round %d) does not follow what is here", self.name, request_id,
                        msg.migration_id, msg.round)
            return
        try:
            engine.extend(parked.seq, list(msg.generated_ids))
        except (ValueError, RuntimeError) as exc:
            log.warning("%s: hand-over of %s failed (%s); the router's StartInference restarts it", self.name,
                        request_id, exc)
            self._drop(request_id, engine)
            return
        del self.parked[request_id]
        parked.seq.text = msg.text_so_far
        outbox.run_now(parked.seq)

    def continue_parked(self, msg: StartInference, engine: MigrationEngine) -> Sequence | None:
        """The router's StartInference for a request whose cache was rebuilt here: only the last few tokens are
        new. Returns the request caught up, to run now; None when nothing here is usable (the caller starts it
        from its log)."""
        parked = self.parked.pop(msg.request_id, None)
        if parked is None or not msg.prompt_ids:
            return None
        seq = parked.seq
        have = seq.tokens
        log_ids = list(msg.prompt_ids) + list(msg.generated_ids)
        if log_ids[: len(have)] != have or seq.prompt_ids != list(msg.prompt_ids):
            log.warning("%s: parked cache of %s does not match the log; recomputing", self.name, msg.request_id)
            engine.release(seq)
            return None
        try:
            engine.extend(seq, log_ids[len(have):])
        except (ValueError, RuntimeError) as exc:
            log.warning("%s: parked cache of %s could not catch up (%s); recomputing", self.name, msg.request_id, exc)
            engine.release(seq)
            return None
        seq.text = msg.text_so_far
        return seq

    def copy_begin(self, msg: KvCopyBegin, engine: MigrationEngine) -> Outbox:
        outbox = Outbox()
        self.expire(engine)
        self._drop(msg.request_id, engine)
        self.incoming[msg.request_id] = Incoming(msg, self.clock())
        if msg.n_chunks <= 0:
            self._copy_complete(msg.request_id, engine, outbox)
        return outbox

    def copy_chunk(self, msg: KvCopyChunk, engine: MigrationEngine) -> Outbox:
        outbox = Outbox()
        inc = self.incoming.get(msg.request_id)
        if inc is None or inc.begin.migration_id != msg.migration_id or inc.begin.round != msg.round:
            return outbox  # a copy given up on, or a late duplicate
        inc.chunks[msg.index] = msg.data
        # Chunks travel one path in order: the last one closes the copy, complete or not.
        if msg.index == inc.begin.n_chunks - 1 or len(inc.chunks) >= inc.begin.n_chunks:
            self._copy_complete(msg.request_id, engine, outbox)
        return outbox

    def _copy_complete(self, request_id: str, engine: MigrationEngine, outbox: Outbox) -> None:
        inc = self.incoming.pop(request_id)
        begin = inc.begin
        started = self.clock()
        seq = sequence_of(begin)
        try:
            layers = decode_cache(begin, inc.chunks)
            engine.import_cache(seq, begin.n_cached, layers)
        except (ValueError, RuntimeError, TypeError) as exc:
            engine.release(seq)
            log.warning("%s: KV copy of %s refused: %s", self.name, request_id, exc)
            outbox.send(ResumeFailed(begin.migration_id, begin.round, request_id, begin.source_instance,
                                     str(exc), copy_failed=True), begin.source_node)
            return
        self.parked[request_id] = Parked(seq, begin.migration_id, begin.round, self.clock())
        outbox.send(ResumeDone(begin.migration_id, begin.round, request_id, begin.source_instance,
                               len(seq.tokens), self.clock() - started), begin.source_node)

    def _drop(self, request_id: str, engine: MigrationEngine) -> None:
        parked = self.parked.pop(request_id, None)
        if parked is not None:
            engine.release(parked.seq)

    def expire(self, engine: MigrationEngine) -> None:
        """Drop parked caches and half-received copies nobody continued within :data:`PARKED_TTL_S`."""
        now = self.clock()
        for request_id in [r for r, p in self.parked.items() if now - p.since > PARKED_TTL_S]:
            self._drop(request_id, engine)
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


__all__ = ["PARKED_TTL_S", "Incoming", "MigrationDestination", "Parked", "decode_cache", "sequence_of"]
