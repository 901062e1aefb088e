"""Which requests run in the next engine step, and how many of their tokens.

Continuous batching: every step carries one decode token for each running request plus prefill chunks of
new (or preempted, or resumed) ones, under a token budget, so a long prompt is cut into chunks and never
stalls the streams. Requests join and leave between steps.

When the KV pool cannot hold the next token of every running request, the newest running request is
preempted: its blocks are freed and it waits again, first in line, to be recomputed from its token log
(which makes the recompute exact). Nothing is dropped. With prefix caching a request starting its (re)prefill
first takes the blocks the cache holds of its log (shared, reference-counted: freeing a preempted request's
blocks never frees one another request holds), and prefills only the rest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sllm_actors.gpu.block_manager import BlockManager
from sllm_actors.gpu.sequence import Sequence


@dataclass
class Chunk:
    seq: Sequence
    start: int
    length: int


@dataclass
class StepPlan:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[Chunk] = field(default_factory=list)
    ready: list[Sequence] = field(default_factory=list)
    """Requests whose next logits are already there (a cache rebuilt or copied by a migration): sampled with
    the step's rows, no forward."""
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.decodes or self.prefills or self.ready)


class BatchScheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_batched_tokens: int,
                 chunk_align: int = 0) -> None:
        self.blocks = blocks
        self.max_num_seqs = max(1, max_num_seqs)
        self.max_batched_tokens = max(1, max_batched_tokens)
        self.chunk_align = chunk_align
        """Non-zero (deterministic mode): prefill chunks end only at multiples of this many positions, so where
        a prompt is cut never depends on what else shared the step."""
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """Admitted, holding blocks, in admission order (the last is preempted first)."""

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self, seq: Sequence) -> None:
        """A request whose cache is already built joins the running batch directly."""
        self.running.append(seq)

    def remove(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self.blocks.free(seq)
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self.blocks.free(seq)
                return seq
        return None

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_batched_tokens
        mid_prefill: list[Sequence] = []
        block_size = self.blocks.block_size
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            index += 1
            if seq.next_logits is not None:
                plan.ready.append(seq)
                continue
            if len(seq.prompt_ids) + len(seq.generated_ids) - seq.num_cached > 1:
                mid_prefill.append(seq)
                continue
            if seq.num_cached < len(seq.block_table) * block_size:
                # The common decode: its next token fits the blocks it holds (the step's host work is on the
                # critical path at hundreds of streams, so the pool is asked only when a block fills up).
                plan.decodes.append(seq)
                budget -= 1
                continue
            while not self.blocks.grow(seq.block_table, seq.num_cached + 1):
                victim = self.running[-1]
                if victim is seq:
                    break
                self._preempt(victim, plan)
            else:
                plan.decodes.append(seq)
                budget -= 1
                continue
            # Alone and still short: it can never fit; everything else was preempted for it.
            self.running.remove(seq)
            index -= 1
            self.blocks.free(seq)
            plan.failed.append((seq, f"the KV pool ({self.blocks.capacity_tokens} tokens) cannot hold "
                                     f"{seq.num_cached + 1} tokens of one request"))
        for seq in mid_prefill:
            budget = self._chunk(seq, budget, plan)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._chunk(seq, budget, plan) == budget:
                break  # no room in the pool yet: it waits for blocks
            self.waiting.popleft()
            self.running.append(seq)
            budget = self.max_batched_tokens - self._planned_tokens(plan)
        if plan.empty() and not plan.failed and self.running:
            # Every admitted request is mid-prefill and the pool is too full for any to go on: free the newest
            # (it is recomputed later), or fail the last one standing, which can never fit.
            seq = self.running[-1]
            if len(self.running) > 1:
                self._preempt(seq, plan)
            else:
                self.running.remove(seq)
                self.blocks.free(seq)
                plan.failed.append((seq, f"the KV pool ({self.blocks.capacity_tokens} tokens) cannot hold the "
                                         f"{seq.n_tokens} tokens of this request"))
        return plan

    def _chunk(self, seq: Sequence, budget: int, plan: StepPlan) -> int:
        # A request starting its (re)prefill first takes what the prefix cache holds of its log.
        hit = self.blocks.match(seq) if not seq.block_table else -1
        remaining = seq.n_tokens - seq.num_cached
        length = min(remaining, budget)
        if self.chunk_align and length < remaining:
            end = (seq.num_cached + length) // self.chunk_align * self.chunk_align
            length = end - seq.num_cached
        if length <= 0 or not self.blocks.grow(seq.block_table, seq.num_cached + length):
            if hit >= 0:
                # It waits for room: it holds nothing meanwhile (shared blocks it took could otherwise not be
                # evicted for the running requests), and looks the cache up again when it goes.
                self.blocks.free(seq)
                seq.num_cached = 0
            return budget
        if hit >= 0:
            self.blocks.record(seq, hit)
        plan.prefills.append(Chunk(seq, seq.num_cached, length))
        return budget - length

    @staticmethod
    def _planned_tokens(plan: StepPlan) -> int:
        return len(plan.decodes) + sum(c.length for c in plan.prefills)

    def _preempt(self, victim: Sequence, plan: StepPlan) -> None:
        self.running.remove(victim)
        self.blocks.free(victim)
        victim.num_cached = 0
        victim.next_logits = None
        victim.preemptions += 1
        self.waiting.appendleft(victim)
        plan.preempted.append(victim)


__all__ = ["BatchScheduler", "Chunk", "StepPlan"]
