"""ModelInstanceActor: one loaded model on one device, serving its requests in one batch.

The actor handles messages and drives the engine (:mod:`sllm_actors.gpu.engine`): each ``Step`` message it
sends itself runs one engine step (one forward over every running request, new prompts prefilled in chunks),
and the step's tokens leave in one ``TokenBatch``. Between two steps the inbox is served, so a cancel, a new
request or a migration order never waits for a generation to end. Requests beyond the batch's size wait in
the engine's queue, never dropped. The live-migration protocol's two sides are state machines in
:mod:`sllm_actors.migration`: this actor feeds them the protocol's messages and its engine, and carries out the
outbox each call returns (sends, events, timers, requests to run now).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import pykka

from sllm_actors.gpu.device_gate import device_gate
from sllm_actors.gpu.engine import Engine, StepResult
from sllm_actors.gpu.output import OutputProcessor, StepTokens
from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import (
    AbortMigration,
    CancelInference,
    InferenceDone,
    InferenceFailed,
    InstanceReady,
    KvCopyBegin,
    KvCopyChunk,
    LoadFailed,
    LoadModel,
    MigrateOut,
    PromptAccepted,
    Query,
    ResumeDone,
    ResumeFailed,
    ResumeRequest,
    StartInference,
    TokenBatch,
)
from sllm_actors.migration import (
    COPY_SEND_MIN_S,
    COPY_SEND_SHARE,
    ArmTimer,
    Event,
    MigrationDestination,
    MigrationSource,
    MigrationTimeout,
    Outbox,
    PrefillTimed,
    Publish,
    RunNow,
    Send,
    sequence_of,
)
from sllm_actors.actors.node.context import Link, NodeContext
from sllm_actors.actors.node.faults import injected_load_failure
from sllm_actors.actors.node.storage_client import SERIAL_PARTS, format_parts, is_checkpoint_fault
from sllm_actors.runtime import trace
from sllm_actors.runtime.supervisor import SupervisedActor
from sllm_actors.runtime.topology import cpu_flags, serving_dtype

__all__ = ["ModelInstanceActor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """In-process: run one engine step."""


@dataclass(frozen=True)
class StopHit:
    """In-process, from the output processor: the request's text reached a stop string after ``n_generated``
    tokens; its stream and its InferenceDone are sent, the engine still holds it."""

    request_id: str
    n_generated: int


_READS_TEXT = (MigrateOut, ResumeDone, ResumeFailed, MigrationTimeout)
"""What the migration's source side answers with a request's text so far (its next round's ``text_so_far``): the
output processor makes that text, so it catches up first."""

FINISHED_TTL_S = 60.0
"""How long a finished request's id is remembered, so a late duplicate StartInference does not restart it."""
KV_SHARE = 0.5
"""Without a ``kv_cache`` size in the topology, the KV pool takes this share of what the GPU has free after the
weights: other models must still fit beside it (a serverless GPU holds several), and the scheduler sees the
pool in the instance's memory."""
KV_DEFAULT_MAX = 8 * 1024**3
KV_MIN = 16 * 1024**2
PUBLISH_EVERY_S = 0.5
"""While decoding, the board (KV blocks in use) is refreshed at most this often."""
GRAPHS_ENV = "SLLM_CUDA_GRAPHS"
"""``SLLM_CUDA_GRAPHS=0`` serves decode eagerly on CUDA too (the benchmark's baseline)."""
PREFILL_GRAPHS_ENV = "SLLM_PREFILL_GRAPHS"
"""``SLLM_PREFILL_GRAPHS=1`` captures new prompts' prefill steps in CUDA graphs. Off by default until a GPU run has
checked them (they were written in a session without device time: benchmarks/device/run_engine_goals.sh is that
run); ``0`` or unset runs them eagerly, as before."""
CPU_FLAGS = cpu_flags()
"""Read once: whether this CPU has native bf16 products decides a CPU instance's default dtype."""
BATCHED_TOKENS_ENV = "SLLM_MAX_BATCHED_TOKENS"
"""Overrides the engine's token budget per step (2,048 on CUDA, 512 on a CPU): how many prompt tokens one step
prefills (benchmarks of where the first token goes under a burst of arrivals)."""
OUTPUT_ENV = "SLLM_OUTPUT_THREAD"
"""``SLLM_OUTPUT_THREAD=0`` detokenizes on the step thread, as before the output processor (the benchmark's
baseline for it)."""


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
        options: LoadModel | None = None,
        memory_free: int = 0,
    ) -> None:
        super().__init__(supervisor, name)
        self.node = node
        self.instance_id = instance_id
        self.model_name = model_name
        self.source = source
        self.gpu_index = gpu_index
        self.device = device
        self.max_concurrency = max(1, max_concurrency)
        self.options = options
        self.memory_free = memory_free
        self.engine: Engine | None = None
        self.link: Link | None = None
        self.step_scheduled = False
        self.source_side = MigrationSource(instance_id, node.name, name=name)
        self.dest_side = MigrationDestination(name=name)
        self.finished: dict[str, float] = {}
        """request id -> when it finished here (a duplicate StartInference for it is ignored)."""
        self.finished_logs: dict[str, tuple[Sequence, str]] = {}
        """request id -> its whole log and how it ended, for ``FINISHED_TTL_S``: a controller that restarted
        before it heard the end learns it when this node re-registers."""
        self.owners: dict[str, str] = {}
        """request id -> the client that owns it (``StartInference.owner``), reported on re-registration."""
        self.memory_bytes = 0
        self.published_at = 0.0
        self.ready_at: float | None = None
        """Until the first token leaves: when the instance said it was ready (the first token's timing is logged)."""
        self.first_admitted_s = 0.0
        self.on_unload: Any = None
        """The storage's clean-up for this instance's load (``Loaded.on_unload``), run when it stops."""
        self.output: OutputProcessor | None = None
        """Once the engine serves: the thread that detokenizes and sends every message of this instance, in order."""
        self.admitted = False
        """Requests were admitted since the board was last published (it is published after the next step, not
        once per arrival: N arrivals would publish N times)."""

    # ------------------------------------------------------------------ lifecycle

    def send(self, msg: Any, address: str = "") -> None:
        """Through the output processor once it runs (after the tokens queued before ``msg``), else now."""
        if self.output is not None:
            self.output.message(msg, address)
        else:
            self._send_now(msg, address)

    def _send_now(self, msg: Any, address: str = "") -> None:
        if self.link is not None:
            self.link.send(msg, address)
        else:
            self.node.send(msg, address)

    def _stop_hit(self, request_id: str, n_generated: int) -> None:
        """The output processor's thread: a stream ended at its stop string."""
        self.tell_quietly(StopHit(request_id, n_generated))

    def tell_quietly(self, message: Any) -> None:
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            pass  # the instance is gone, and its migrations with it

    def started(self) -> None:
        self.link = self.node.open_link(self.instance_id)
        self.publish("loading")
        started = time.perf_counter()
        opts = self.options
        dtype = serving_dtype(opts.dtype if opts is not None else "", self.device, CPU_FLAGS)
        loaded = None
        try:
            injected = injected_load_failure(self.node.name, self.model_name)
            if injected:
                raise RuntimeError(injected)  # a drill's failure, where a real one would come from
            # Shared with the other engines on this GPU, never beside one's CUDA graph capture: the loader
            # synchronises the device, which would break a capture (gpu/device_gate.py).
            with device_gate(self.device).shared(long=True):
                loaded = self.node.storage.load(self.model_name, self.source, self.device, dtype)
                self.on_unload = loaded.on_unload
                self.engine = self._engine(loaded.model, loaded.tokenizer, loaded.memory_bytes)
        except Exception as exc:  # any load problem is this request's failure, reported as data
            log.warning("%s: loading %s failed: %s", self.name, self.model_name, exc)
            self.send(LoadFailed(self.instance_id, self.node.name, self.model_name, f"{exc}",
                                 checkpoint_fault=is_checkpoint_fault(exc)))
            self.publish("failed")
            self.actor_ref.stop(block=False)
            if loaded is not None and loaded.after_ready is not None:
                loaded.after_ready()
            return
        self.memory_bytes = loaded.memory_bytes + self.engine.kv_pool_bytes
        # From here on the step thread only samples ids; their text, the stop strings and every send are the
        # output processor's (gpu/output.py).
        if os.environ.get(OUTPUT_ENV, "1") != "0":
            self.output = OutputProcessor(loaded.tokenizer, self.instance_id, self._send_now, self._stop_hit,
                                          self.name)
            self.engine.detokenize = False
        load_s = time.perf_counter() - started
        self.publish("idle")
        # "engine": what the load took beyond the storage's own serial parts (the KV pool, the engine's set-up).
        loaded_parts = {**loaded.parts, **self.engine.setup_parts}
        parts = {**loaded_parts, "engine": load_s - sum(loaded_parts.get(p, 0.0) for p in SERIAL_PARTS)}
        self.send(InstanceReady(self.instance_id, self.node.name, self.gpu_index, self.model_name, load_s, loaded.tier,
                                self.memory_bytes, parts))
        _, total = self.engine.kv_usage()
        self.node.event("load", f"{self.model_name} loaded on {self.node.name}/gpu-{self.gpu_index} from "
                        f"{loaded.tier}{'' if loaded.mode == 'serverlessllm' else f' ({loaded.mode})'} in {load_s:.2f}s ({format_parts(loaded_parts)}; {self.engine.dtype}, KV pool "
                        f"{total} blocks of {self.engine.blocks.block_size} tokens)",
                        {"model": self.model_name, "tier": loaded.tier, "seconds": load_s, "parts": loaded_parts,
                         "load_mode": loaded.mode})
        self.ready_at = time.perf_counter()
        if loaded.after_ready is not None:
            loaded.after_ready()

    def _engine(self, model: Any, tokenizer: Any, weight_bytes: int) -> Engine:
        opts = self.options
        kv_bytes = opts.kv_cache_bytes if opts is not None and opts.kv_cache_bytes else \
            max(KV_MIN, min(KV_DEFAULT_MAX, int(KV_SHARE * (self.memory_free - weight_bytes))))
        max_batch = (opts.max_batch if opts is not None and opts.max_batch else 0) or max(self.max_concurrency, 256)
        budget = int(os.environ.get(BATCHED_TOKENS_ENV, "0") or 0) or None
        return Engine(model, tokenizer, kv_cache_bytes=kv_bytes, max_num_seqs=max_batch, max_batched_tokens=budget,
                      deterministic=bool(opts is not None and opts.deterministic),
                      prefix_caching=opts.prefix_caching if opts is not None else True,
                      cuda_graphs=os.environ.get(GRAPHS_ENV, "1") != "0",
                      prefill_graphs=os.environ.get(PREFILL_GRAPHS_ENV, "0") == "1")

    def stopping(self) -> None:
        if self.output is not None:
            self.output.close()  # what is queued still leaves, before the link closes
            self.output = None
        if self.link is not None:
            self.link.close()
            self.link = None
        self.node.board.remove_instance(self.instance_id)
        self.engine = None
        on_unload, self.on_unload = self.on_unload, None
        if on_unload is not None:
            on_unload()

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        reads_text = isinstance(message, _READS_TEXT) or (isinstance(message, Query) and message.what == "running")
        if reads_text and self.output is not None and not self.output.drain():
            raise RuntimeError(f"{self.name}: the output processor did not catch up within its timeout")
        if isinstance(message, Step):
            self.step_scheduled = False
            self._step()
        elif isinstance(message, StopHit):
            self._stopped(message)
        elif isinstance(message, StartInference):
            self._admit(message)
        elif isinstance(message, CancelInference):
            self._cancel(message.request_id)
        elif isinstance(message, Query) and message.what == "running":
            return self._running()
        elif isinstance(message, (ResumeDone, ResumeFailed, MigrationTimeout, KvCopyBegin, KvCopyChunk)) \
                and self.engine is None:
            pass  # its load failed and it is stopping: no migration of its own to answer, no cache to take in
        elif isinstance(message, MigrateOut):
            self._carry_out(self.source_side.migrate_out(message, self._running_engine()))
        elif isinstance(message, ResumeRequest):
            self._carry_out(self.dest_side.resume_in(message, self._running_engine(), self.finished))
        elif isinstance(message, KvCopyBegin):
            self._carry_out(self.dest_side.copy_begin(message, self._running_engine()))
        elif isinstance(message, KvCopyChunk):
            self._carry_out(self.dest_side.copy_chunk(message, self._running_engine()))
        elif isinstance(message, ResumeDone):
            self._carry_out(self.source_side.round_done(message, self._running_engine()))
        elif isinstance(message, ResumeFailed):
            self._carry_out(self.source_side.resume_failed(message, self._running_engine()))
        elif isinstance(message, AbortMigration):
            self._carry_out(self.source_side.abort(message.migration_id, message.reason))
        elif isinstance(message, MigrationTimeout):
            self._carry_out(self.source_side.timed_out(message, self._running_engine()))
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    def _stopped(self, msg: StopHit) -> None:
        """Take a request that reached its stop string out of the batch (its InferenceDone is sent)."""
        seq = self.engine.remove(msg.request_id) if self.engine is not None else None
        self._carry_out(self.source_side.flush(msg.request_id))
        self.finished[msg.request_id] = time.monotonic()
        if seq is not None:
            self.finished_logs[msg.request_id] = (seq, "stop")
            self.owners.pop(msg.request_id, None)
        self.publish()

    def _running_engine(self) -> Engine:
        assert self.engine is not None, f"{self.name}: no engine (its load failed)"
        return self.engine

    def _carry_out(self, outbox: Outbox) -> None:
        """Do what a migration side asked, in its order: the protocol's wire order is the outbox's."""
        for action in outbox.actions:
            if isinstance(action, Send):
                self.send(action.message, action.address)
            elif isinstance(action, Event):
                self.node.event(action.kind, action.text, action.data)
            elif isinstance(action, Publish):
                self.publish()
            elif isinstance(action, ArmTimer):
                timer = threading.Timer(action.seconds, self.tell_quietly, args=(action.timeout,))
                timer.daemon = True
                timer.start()
            elif isinstance(action, RunNow):
                self.run_now(action.seq)
            elif isinstance(action, PrefillTimed):
                self.source_side.observe_prefill(action.tokens, action.seconds)
            else:
                raise TypeError(f"{self.name}: unexpected migration action {action!r}")

    def _running(self) -> list[dict[str, Any]]:
        """Each request here and each finished lately, with its token log (``NodeHello.running``)."""
        # Built now, not when each finished: the output processor had caught up with their text only now.
        out = [self._log_of(seq, reason) for seq, reason in self.finished_logs.values()]
        for seq in self.engine.requests if self.engine is not None else []:
            out.append(self._log_of(seq, ""))
        return out

    def _log_of(self, seq: Sequence, finish_reason: str) -> dict[str, Any]:
        return {"request_id": seq.request_id, "instance_id": self.instance_id, "model": self.model_name,
                "prompt_ids": list(seq.prompt_ids), "generated_ids": list(seq.generated_ids), "text": seq.text,
                "owner": self.owners.get(seq.request_id, ""), "cache_salt": seq.cache_salt,
                "finish_reason": finish_reason, **seq.sampling.fields()}

    def _admit(self, msg: StartInference) -> None:
        trace.mark(msg.request_id, "inst_in")
        engine = self.engine
        assert engine is not None
        if engine.get(msg.request_id) is not None or msg.request_id in self.finished:
            return  # a duplicate (the router's after a hand-over), or handed over and finished here already
        if msg.owner:
            self.owners[msg.request_id] = msg.owner
        caught_up = self.dest_side.continue_parked(msg, engine)
        if caught_up is not None:
            self.run_now(caught_up)
            return
        try:
            prompt_ids = list(msg.prompt_ids)
            if not prompt_ids:
                prompt_ids = engine.tokenize(msg.prompt, msg.chat)
                if not prompt_ids:
                    raise ValueError("the prompt tokenizes to nothing")
                self.send(PromptAccepted(msg.request_id, self.instance_id, prompt_ids))
            seq = sequence_of(msg)
            seq.prompt_ids = prompt_ids
            if len(seq.generated_ids) >= seq.sampling.max_tokens:
                self._finish(seq, "length")
                return
            engine.add(seq)
            trace.mark(msg.request_id, "engine_queued")
        except ValueError as exc:
            self.send(InferenceFailed(msg.request_id, self.instance_id, "bad_request", str(exc)))
            return
        if self.ready_at is not None and not self.first_admitted_s:
            self.first_admitted_s = time.perf_counter() - self.ready_at
        self.admitted = True
        self._schedule_step()

    def run_now(self, seq: Sequence) -> None:
        """A request whose cache is ready (a migration's destination) emits its next token at once (the
        catch-up's forward made its logits) and joins the batch."""
        assert self.engine is not None
        if len(seq.generated_ids) >= seq.sampling.max_tokens:
            self.engine.release(seq)
            self._finish(seq, "length")
            return
        index = len(seq.generated_ids)
        token, delta = self.engine.step(seq)
        self.send(TokenBatch(self.instance_id, [seq.request_id], [index], [[token]], [delta]))
        if seq.finish_reason:
            self._finish(seq, seq.finish_reason)
        else:
            self.engine.admit(seq)
            self._schedule_step()
        self.publish()

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._carry_out(self.source_side.flush(seq.request_id))
        self.finished[seq.request_id] = time.monotonic()
        self.finished_logs[seq.request_id] = (seq, reason)
        self.owners.pop(seq.request_id, None)
        self.send(InferenceDone(seq.request_id, self.instance_id, reason, len(seq.generated_ids)))

    def _cancel(self, request_id: str) -> None:
        assert self.engine is not None
        self.owners.pop(request_id, None)
        if self.engine.remove(request_id) is not None:
            self._carry_out(self.source_side.flush(request_id))
        self.publish()

    # ------------------------------------------------------------------ decoding

    def _schedule_step(self) -> None:
        if not self.step_scheduled and self.engine is not None and self.engine.has_work():
            self.step_scheduled = True
            self.actor_ref.tell(Step())

    def _step(self) -> None:
        engine = self.engine
        assert engine is not None
        result = engine.step_batch()
        self._emit(result)
        if self.ready_at is not None and result.tokens:
            # What a cold start's first token costs after the load: the request's way here, then its step.
            log.info("%s: first token %.3fs after ready (the request arrived after %.3fs; its step took %.3fs)",
                     self.name, time.perf_counter() - self.ready_at, self.first_admitted_s, result.seconds)
            self.ready_at = None
        if self.source_side.copies_pending():
            # A share of a step for KV copies: the streams slow a little instead of stopping.
            self._carry_out(self.source_side.pump(budget_s=max(COPY_SEND_MIN_S, COPY_SEND_SHARE * result.seconds)))
        now = time.monotonic()
        if result.finished or result.failed or result.preempted or self.admitted \
                or now - self.published_at > PUBLISH_EVERY_S:
            self._expire()
            self.publish()
        self._schedule_step()

    def _emit(self, result: StepResult) -> None:
        if result.tokens and self.output is not None and self.engine is not None:
            # Their text and their TokenBatch are the output processor's; what follows (a finished request's
            # InferenceDone) is queued behind them.
            eos = self.engine.eos_ids
            self.output.tokens(StepTokens([(t.seq, t.index, t.token, t.token in eos) for t in result.tokens]))
        elif result.tokens:
            self.send(TokenBatch(self.instance_id, [t.seq.request_id for t in result.tokens],
                                 [t.index for t in result.tokens], [[t.token] for t in result.tokens],
                                 [t.text for t in result.tokens]))
            if trace.enabled():
                trace.mark_many((t.seq.request_id for t in result.tokens if t.index == 0), "token_sent")
        for seq in result.finished:
            self._finish(seq, seq.finish_reason)
        for seq, problem in result.failed:
            self._carry_out(self.source_side.flush(seq.request_id))
            self.send(InferenceFailed(seq.request_id, self.instance_id, "kv_pool", problem))

    def _expire(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, t in self.finished.items() if now - t > FINISHED_TTL_S]:
            del self.finished[request_id]
            self.finished_logs.pop(request_id, None)

    def publish(self, state: str | None = None) -> None:
        self.published_at = time.monotonic()
        self.admitted = False
        engine = self.engine
        running = engine.requests if engine is not None else []
        if state is None:
            state = "migrating" if self.source_side.busy() else "running" if running else "idle"
        used, total = engine.kv_usage() if engine is not None else (0, 0)
        hits, queries = engine.prefix_cache_usage() if engine is not None else (0, 0)
        waiting = engine.waiting_count() if engine is not None else 0
        self.node.board.update_instance(
            self.instance_id,
            model=self.model_name,
            gpu=self.gpu_index,
            state=state,
            requests=sorted(s.request_id for s in running),
            queued=waiting,
            memory_bytes=self.memory_bytes,
            kv_blocks_used=used,
            kv_blocks_total=total,
            prefix_hit_tokens=hits,
            prefix_query_tokens=queries,
            preemptions=engine.preemptions if engine is not None else 0,
            cuda_graphs=len(engine.runner.graph_shapes) if engine is not None else 0,
        )
