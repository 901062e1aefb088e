"""The serving engine of one model instance: continuous batching over a paged KV cache.

A request's whole state is its token log (prompt ids + generated ids) and its sampling parameters: the KV
cache is derived (a prefill over the log rebuilds it), and the random choice at step ``k`` is a function of
``(seed, k)`` alone. That is what lets a request be preempted and recomputed, or continue on another instance
after a migration or a crash, exactly as it would have.

Parts, as a reader can name them: :mod:`~sllm_actors.gpu.sequence` (a request's state),
:mod:`~sllm_actors.gpu.block_manager` (who holds which KV blocks), :mod:`~sllm_actors.gpu.scheduler` (what runs
in a step), :mod:`~sllm_actors.gpu.runner` (the forward and the pool), :mod:`~sllm_actors.gpu.cuda_graphs`
(captured decode steps), :mod:`~sllm_actors.gpu.attention` (paged attention inside transformers' model code),
:mod:`~sllm_actors.gpu.sampler` (the batch's tokens on the device) and :mod:`~sllm_actors.gpu.detokenizer`
(the text, token by token).

Two ways in: :meth:`Engine.add` + :meth:`Engine.step_batch` serve requests together, one forward per step;
:meth:`Engine.prefill`, :meth:`Engine.extend`, :meth:`Engine.import_cache` and :meth:`Engine.step` work on one
request at once (a migration's rounds, tests), and :meth:`Engine.admit` moves such a request into the batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sllm_actors.gpu.block_manager import SCRATCH_BLOCK, BlockManager
from sllm_actors.gpu.detokenizer import IncrementalDetokenizer
from sllm_actors.gpu.device_gate import device_gate
from sllm_actors.gpu.output import find_stop
from sllm_actors.gpu.runner import Feed, ModelRunner, kv_bytes_per_token
from sllm_actors.gpu.sampler import choose_token, sample, step_seed
from sllm_actors.gpu.scheduler import BatchScheduler, StepPlan
from sllm_actors.gpu.sequence import Sequence
from sllm_actors.runtime import trace

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16
WARMUP_TOKENS = 8
"""The warm-up prompt's length: prefill and decode at load time run different kernels, so both run once."""
DEFAULT_KV_BYTES = 256 * 1024**2
"""The pool of an engine built without a budget (tests, benchmarks); instances size theirs from the GPU's."""
_WARMED: set[tuple[str, str, str, str]] = set()
"""Models this process has run through the paged path, by (class, device, dtype, config): the same model loaded
again (a DRAM hit after its unload) finds its kernels loaded and its code known to run, so a warm-up would only
delay the request that is waiting for the load."""


def forget_warm_ups() -> None:
    """The next engine of every model warms up again, as in a fresh process (benchmarks that time the warm-up)."""
    _WARMED.clear()


@dataclass
class TokenOut:
    seq: Sequence
    index: int
    """Position of the token in the generated sequence."""
    token: int
    text: str


@dataclass
class StepResult:
    tokens: list[TokenOut] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)
    preempted: int = 0
    seconds: float = 0.0


class Engine:
    """Runs the requests of one model on one device."""

    def __init__(self, model: Any, tokenizer: Any, *, kv_cache_bytes: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, max_num_seqs: int = 256, max_batched_tokens: int | None = None,
                 deterministic: bool = False, cuda_graphs: bool = True, prefix_caching: bool = False,
                 prefill_graphs: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        eos: set[int] = set()
        for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list):
                eos.update(source)
        self.eos_ids = eos
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30) or (1 << 30))
        self.deterministic = deterministic
        per_token = kv_bytes_per_token(model.config, self.dtype)
        self.kv_bytes_per_token = per_token
        num_blocks = max(2, int(kv_cache_bytes or DEFAULT_KV_BYTES) // (per_token * block_size))
        # Deterministic mode keeps prefix caching off: a prompt whose prefix came from the cache would be cut into
        # chunks at other positions than the same prompt computed whole, and its result would depend on what ran
        # before it on the instance.
        self.prefix_caching = prefix_caching and not deterministic
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=self.prefix_caching)
        if max_batched_tokens is None:
            max_batched_tokens = 2048 if self.device.type == "cuda" else 512
        self.max_batched_tokens = max_batched_tokens
        self.scheduler = BatchScheduler(self.blocks, max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
                                        chunk_align=max_batched_tokens if deterministic else 0)
        self.gate = device_gate(self.device)
        """Shared by every engine on this device in the process: device work holds it shared, a CUDA graph
        capture exclusive (:mod:`~sllm_actors.gpu.device_gate`)."""
        self.warmup_s = 0.0
        with self.gate.shared():
            # Prefill graphs pad a step's prompts to a captured shape: what a prompt computes would then depend on
            # what shared its step (and on whether the shape was captured yet), which deterministic mode rules out.
            self.runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size, cuda_graphs=cuda_graphs,
                                      prefill_graphs=prefill_graphs and not deterministic)
            self._warm_up()
        self.preemptions = 0
        self.detokenize = True
        """Whether :meth:`step_batch` makes each token's text and checks stop strings. An instance turns it off and
        does both on its output processor's thread (:mod:`~sllm_actors.gpu.output`); the tokens then carry no
        text, and a request ends at a stop string when the processor finds it."""

    def _warm_up(self) -> None:
        """A short prefill and one decode step through the paged path, into the scratch block, at load time: the
        first request finds kernels loaded, workspaces and allocator pools made for the path it is served by.
        A model whose code cannot run on that path fails its load with the reason here, instead of crashing its
        instance on the first request. Skipped for a model this process has already run so (``_WARMED``)."""
        key = (type(self.model).__qualname__, str(self.device), str(self.dtype), self.model.config.to_json_string())
        if key in _WARMED:
            return
        started = time.perf_counter()
        try:
            n = min(WARMUP_TOKENS, self.blocks.block_size - 1)  # prompt and decode fit the scratch block
            self.runner.execute([Feed([0] * n, 0, [SCRATCH_BLOCK], True)], 0)
            self.runner.execute([Feed([0], n, [SCRATCH_BLOCK], True)], 1)
        except Exception as exc:  # any failure here means this architecture is not servable by the engine
            name = type(self.model).__name__
            raise ValueError(f"{name} cannot run on the engine's paged attention: {type(exc).__name__}: {exc}") \
                from exc
        self._settle()
        self.warmup_s = time.perf_counter() - started
        _WARMED.add(key)

    @property
    def setup_parts(self) -> dict[str, float]:
        """Where the engine's set-up went, in seconds (the load parts ``kv_pool``, ``norms``, ``warmup``)."""
        return {**self.runner.setup_parts, "warmup": self.warmup_s}

    # ------------------------------------------------------------------ what the instance shows

    @property
    def kv_pool_bytes(self) -> int:
        return self.runner.pool_bytes

    def kv_usage(self) -> tuple[int, int]:
        """(blocks in use, blocks in the pool)."""
        return self.blocks.used_blocks, self.blocks.capacity_blocks

    def prefix_cache_usage(self) -> tuple[int, int]:
        """(prompt tokens served from the prefix cache, tokens looked up), since the engine started: every
        (re)prefill looks its whole log up; what is not served is computed."""
        return self.blocks.hit_tokens, self.blocks.query_tokens

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def waiting_count(self) -> int:
        """Requests queued for their (re)prefill: new, resumed, or preempted for room in the KV pool."""
        return len(self.scheduler.waiting)

    @property
    def requests(self) -> list[Sequence]:
        """Every request in the batch: running, then waiting."""
        return list(self.scheduler.running) + list(self.scheduler.waiting)

    # ------------------------------------------------------------------ requests

    def tokenize(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this model has no chat template; send the prompt without chat")
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if not isinstance(ids, list):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(prompt)["input_ids"]]

    def check_fits(self, seq: Sequence) -> None:
        """A clear error for a request that can never run here, before it takes any room."""
        n = len(seq.tokens)
        if n >= self.max_positions:
            raise ValueError(f"{n} tokens exceed the model's context of {self.max_positions}")
        max_tokens = seq.sampling.max_tokens
        need = min(len(seq.prompt_ids) + max(max_tokens, len(seq.generated_ids)), self.max_positions)
        if need > self.blocks.capacity_tokens:
            raise ValueError(f"the request needs up to {need} tokens of KV cache (prompt {len(seq.prompt_ids)} + "
                             f"max_tokens {max_tokens}); this instance's KV pool holds "
                             f"{self.blocks.capacity_tokens}")

    def add(self, seq: Sequence) -> None:
        """Queue a request (new, or resumed from its log) to be prefilled and decoded in the batch."""
        self.check_fits(seq)
        self._prepare(seq)
        self.scheduler.add(seq)

    def admit(self, seq: Sequence) -> None:
        """A request whose cache this engine already holds (:meth:`prefill`, :meth:`import_cache`) joins the batch."""
        self.scheduler.admit(seq)

    def get(self, request_id: str) -> Sequence | None:
        """A request in the batch (running or waiting), or None."""
        for seq in self.scheduler.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.scheduler.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def remove(self, request_id: str) -> Sequence | None:
        """Take a request out of the batch (cancelled, finished, migrated away) and free its blocks."""
        return self.scheduler.remove(request_id)

    def release(self, seq: Sequence) -> None:
        """Free the blocks of a request held outside the batch (a migration's parked cache)."""
        self.blocks.free(seq)
        seq.num_cached = 0
        seq.next_logits = None

    def _prepare(self, seq: Sequence) -> None:
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.generated_ids)
        seq.num_cached = 0
        seq.next_logits = None

    # ------------------------------------------------------------------ the batch

    def step_batch(self) -> StepResult:
        """One engine step: one forward over every running request (decode) and the prefill chunks that fit."""
        with self.gate.shared():
            return self._step_batch()

    def _step_batch(self) -> StepResult:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        result = StepResult(failed=list(plan.failed), preempted=len(plan.preempted))
        self.preemptions += len(plan.preempted)
        if plan.preempted:
            log.info("KV pool full: preempted %s (recomputed from their logs later)",
                     ", ".join(s.request_id for s in plan.preempted))
        if plan.empty():
            return result
        if trace.enabled():
            trace.mark_many((c.seq.request_id for c in plan.prefills), "step_start", time.time())
        if self.deterministic:
            groups = [StepPlan(decodes=[s]) for s in plan.decodes] + [StepPlan(prefills=[c]) for c in plan.prefills]
        else:
            groups = [plan]
        rows: list[torch.Tensor] = []
        sampled: list[Sequence] = []
        for group in groups:
            logits, who = self._forward(group)
            if logits is not None:
                rows.append(logits)
            sampled.extend(who)
        for seq in plan.ready:
            assert seq.next_logits is not None
            rows.append(seq.next_logits[None, :])
            seq.next_logits = None
            sampled.append(seq)
        if sampled:
            tokens = self._sample(torch.cat(rows) if len(rows) > 1 else rows[0], sampled)
            if trace.enabled():
                trace.mark_many((s.request_id for s in sampled if not s.generated_ids), "token_sampled")
            for seq, token in zip(sampled, tokens):
                out = self._accept(seq, token, self.detokenize)
                result.tokens.append(out)
                if seq.finish_reason:
                    self.scheduler.remove(seq.request_id)
                    result.finished.append(seq)
        result.seconds = time.perf_counter() - started
        return result

    def _forward(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Run the plan's decodes and prefill chunks; returns the logits of those that sample now, in order."""
        feeds: list[Feed] = []
        who: list[Sequence] = []
        for seq in plan.decodes:
            feeds.append(Feed([seq.token_at(seq.num_cached)], seq.num_cached, seq.block_table, True))
            who.append(seq)
        for chunk in plan.prefills:
            seq = chunk.seq
            end = chunk.start + chunk.length
            last = end == seq.n_tokens
            feeds.append(Feed(seq.tokens[chunk.start:end], chunk.start, seq.block_table, last))
            if last:
                who.append(seq)
        if not feeds:
            return None, []
        # Only new prompts' prefills run padded under a graph: a request recomputed from its log (resumed,
        # preempted) is prefilled exactly as before, unpadded, as a one-request rebuild (a migration) is.
        fresh = all(not chunk.seq.generated_ids for chunk in plan.prefills)
        logits = self.runner.execute(feeds, len(plan.decodes), graph_prefill=fresh)
        for seq in plan.decodes:
            seq.num_cached += 1
            self.blocks.commit(seq)
        for chunk in plan.prefills:
            chunk.seq.num_cached = chunk.start + chunk.length
            self.blocks.commit(chunk.seq)
        return (logits if who else None), who

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        params = [s.sampling for s in seqs]
        step_seeds = []
        for seq, p in zip(seqs, params):
            assert p.seed is not None, "the router draws the seed of every request it sends on"
            step_seeds.append(step_seed(p.seed, len(seq.generated_ids)))
        ids = sample(logits, [p.temperature for p in params], [p.top_p for p in params], step_seeds)
        return ids.tolist()  # the step's one device-to-host copy

    def _accept(self, seq: Sequence, token: int, detokenize: bool = True) -> TokenOut:
        """Append a sampled token to the log: text delta and stop strings (``detokenize``), end conditions."""
        index = len(seq.generated_ids)
        seq.generated_ids.append(token)
        delta = ""
        if detokenize:
            assert seq.detok is not None
            delta = seq.detok.push(token)
        if token in self.eos_ids:
            seq.finish_reason = "eos"
            return TokenOut(seq, index, token, "")
        if detokenize:
            cut = find_stop(seq.text, delta, seq.sampling.stop)
            if cut >= 0:
                combined = seq.text + delta
                delta = combined[:cut][len(seq.text):]
                seq.text = combined[:cut]
                seq.finish_reason = "stop"
                return TokenOut(seq, index, token, delta)
            seq.text += delta
        if len(seq.generated_ids) >= seq.sampling.max_tokens:
            seq.finish_reason = "length"
        elif seq.n_tokens >= self.max_positions:
            seq.finish_reason = "context"
        return TokenOut(seq, index, token, delta)

    # ------------------------------------------------------------------ one request at once (migration, tests)

    def prefill(self, seq: Sequence) -> float:
        """Build the KV cache for every token of the log now, outside the batch, and keep the last token's
        logits: the request's next token needs no forward of its own. Returns seconds spent."""
        started = time.perf_counter()
        self.check_fits(seq)
        self.release(seq)
        self._prepare(seq)
        self.blocks.record(seq, self.blocks.match(seq))
        try:
            with self.gate.shared():
                self._feed(seq, len(seq.tokens))
        except ValueError:
            self.release(seq)  # the prefix blocks it took from the cache are not kept by a request that failed
            raise
        return time.perf_counter() - started

    def extend(self, seq: Sequence, new_ids: list[int]) -> float:
        """Append tokens to the log and feed them into the existing cache (a migration round, the catch-up):
        one forward, the last logits kept. Returns seconds spent."""
        if not new_ids:
            return 0.0
        started = time.perf_counter()
        seq.generated_ids.extend(new_ids)
        assert seq.detok is not None
        for token in new_ids:
            seq.text += seq.detok.push(token)
        with self.gate.shared():
            self._feed(seq, len(seq.tokens))
        return time.perf_counter() - started

    def step(self, seq: Sequence) -> tuple[int, str]:
        """One token of one request alone; returns (token id, text delta). Sets finish_reason when done."""
        if seq.detok is None:
            self._prepare(seq)
        with self.gate.shared():
            if seq.next_logits is None:
                self._feed(seq, len(seq.tokens))
            logits, seq.next_logits = seq.next_logits, None
            assert logits is not None
            token = self._sample(logits[None, :], [seq])[0]
        out = self._accept(seq, token)
        if seq.finish_reason and seq not in self.scheduler.running:
            self.release(seq)
        return out.token, out.text

    def _feed(self, seq: Sequence, upto: int) -> None:
        """Feed the log's tokens ``num_cached .. upto`` in chunks of the step budget; keep the last logits."""
        if not self.blocks.grow(seq.block_table, upto):
            need = self.blocks.missing(seq.block_table, upto)
            raise ValueError(f"the KV pool has {self.blocks.free_blocks} free blocks, {need} needed for "
                             f"{upto} tokens of {seq.request_id}")
        tokens = seq.tokens
        logits = None
        while seq.num_cached < upto:
            start = seq.num_cached
            end = min(upto, start + self.max_batched_tokens)
            if self.deterministic:
                end = min(upto, (start // self.max_batched_tokens + 1) * self.max_batched_tokens)
            # One token against a cache is a decode: the same path (and kernels) as in the batch.
            decode = 1 if end - start == 1 and start > 0 else 0
            logits = self.runner.execute([Feed(tokens[start:end], start, seq.block_table, end == upto)], decode)
            seq.num_cached = end
        self.blocks.commit(seq)
        seq.next_logits = logits[0] if logits is not None else None
        self._settle()

    def _settle(self) -> None:
        """Wait until the device has run what was queued. CUDA kernels run asynchronously: without this a
        migration round reported its cache rebuilt while a 4k-token prefill was still queued, and the
        recompute-time fits learned from such rounds measured the queueing, not the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ KV cache copy (live migration)

    def export_cache(self, seq: Sequence) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(tokens the cache covers, [(keys, values)] per layer, each ``[1, kv_heads, tokens, head_dim]``):
        a copy gathered from the request's blocks, so decoding can go on while it is sent."""
        n = seq.num_cached
        if n <= 0 or not seq.block_table:
            raise ValueError(f"{seq.request_id} has no KV cache to export")
        k, v = self.runner.k_cache, self.runner.v_cache
        with self.gate.shared():
            slots = self.runner.context_slots(seq.block_table, n)
            layers = [(k[i, slots].permute(1, 0, 2)[None].contiguous(),
                       v[i, slots].permute(1, 0, 2)[None].contiguous()) for i in range(k.shape[0])]
        return n, layers

    def import_cache(self, seq: Sequence, n_cached: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Continue ``seq`` from a KV cache copied from another instance (any device, any float dtype).

        The cache holds the first ``n_cached`` tokens of the log; the rest (at least the last token, for its
        logits) are fed here, so the request ends as after a :meth:`prefill`. Returns seconds.
        """
        started = time.perf_counter()
        tokens = seq.tokens
        k_cache, v_cache = self.runner.k_cache, self.runner.v_cache
        if len(layers) != k_cache.shape[0]:
            raise ValueError(f"the copied cache has {len(layers)} layers, the model {k_cache.shape[0]}")
        if not 0 < n_cached <= len(tokens):
            raise ValueError(f"the copied cache covers {n_cached} tokens of a log of {len(tokens)}")
        expected = (1, k_cache.shape[2], n_cached, k_cache.shape[3])
        for index, (keys, values) in enumerate(layers):
            if tuple(keys.shape) != expected or keys.shape != values.shape:
                raise ValueError(f"layer {index}: {tuple(keys.shape)} / {tuple(values.shape)} do not hold "
                                 f"{n_cached} positions of {expected[1]} heads x {expected[3]}")
        self.check_fits(seq)
        self.release(seq)
        self._prepare(seq)
        # The last token goes through the model again here, for the next token's logits.
        keep = min(n_cached, len(tokens) - 1)
        if not self.blocks.grow(seq.block_table, len(tokens)):
            raise ValueError(f"the KV pool has {self.blocks.free_blocks} free blocks, too few for {len(tokens)} "
                             f"tokens of {seq.request_id}")
        with self.gate.shared():
            slots = self.runner.context_slots(seq.block_table, keep)
            for index, (keys, values) in enumerate(layers):
                k_cache[index, slots] = keys[0, :, :keep].permute(1, 0, 2).to(self.device, self.dtype)
                v_cache[index, slots] = values[0, :, :keep].permute(1, 0, 2).to(self.device, self.dtype)
            seq.num_cached = keep
            self._feed(seq, len(tokens))
        return time.perf_counter() - started


__all__ = ["Engine", "StepResult", "TokenOut", "choose_token", "forget_warm_ups", "step_seed"]
