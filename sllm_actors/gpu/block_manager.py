"""The paged KV cache's bookkeeping: which fixed-size blocks of the pool each request holds, and which blocks
hold a prefix other requests can share.

The pool itself (the tensors) belongs to :class:`~sllm_actors.gpu.runner.ModelRunner`; this only hands out
block numbers. Block 0 is never handed out: padded rows of a captured decode step write their keys and
values there, so padding can never touch a live request's cache.

Prefix caching (nano-vllm's block manager is the small model of it): a *full* block whose keys and values are
computed is keyed by the hash of (its prefix's key, its token ids), the first block's prefix being the request's
cache salt, so equal keys mean the same tokens at the same positions after the same prefix, and so the same
keys and values. A request (re)prefilled later takes the longest run of its leading blocks found under their
keys instead of computing them (a chat's system prompt is prefilled once). Blocks are reference-counted: a
shared block is never freed while any request holds it, so preempting one sharer never takes the cache from
another. A block whose last holder lets go keeps its key and its contents and waits at the far end of the free
list: blocks without a key are handed out first, keyed ones least recently freed first (LRU), and a keyed block
handed out is evicted from the map. Only blocks wholly before a request's last token are shared, so every
request computes at least its last token (its logits) into a block of its own, and no shared block is ever
written again. The map checks the block's token ids as well as the hash: a hash collision is a miss.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sllm_actors.gpu.sequence import Sequence

SCRATCH_BLOCK = 0

BlockKey = tuple[int, tuple[int, ...]]
"""(the previous block's hash, or the salt's for the first block; this block's token ids)."""


def salt_hash(salt: str) -> int:
    """The root of a request's block keys: requests with different salts (tenants) never share a block."""
    return hash(("sllm-prefix", salt))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(SCRATCH_BLOCK + 1, num_blocks))
        """Blocks no request holds, handed out from the front: unkeyed ones first, then keyed, least recently
        freed first."""
        self._refs = [0] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._key_of: dict[int, tuple[int, BlockKey]] = {}
        """block -> (its hash, its key), for the blocks in ``_by_hash``."""
        self.hit_tokens = 0
        """Tokens served from the prefix cache, over every lookup (a request's prefill or recompute)."""
        self.query_tokens = 0
        """Tokens looked up in the prefix cache (each lookup counts the request's whole log)."""

    @property
    def capacity_blocks(self) -> int:
        """Blocks a request may ever hold (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out now: unheld, cached prefixes included (they are evicted when taken)."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        """Blocks some request holds."""
        return self.capacity_blocks - len(self._free)

    @property
    def cached_blocks(self) -> int:
        """Blocks whose contents are in the prefix map (held or not)."""
        return len(self._by_hash)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def missing(self, table: list[int], n_tokens: int) -> int:
        """Blocks ``table`` lacks to hold ``n_tokens`` tokens."""
        return max(0, self.blocks_for(n_tokens) - len(table))

    def grow(self, table: list[int], n_tokens: int) -> bool:
        """Extend ``table`` in place to hold ``n_tokens``; False (and nothing taken) when the pool is short."""
        need = self.missing(table, n_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._refs[block] = 1
            table.append(block)
        return True

    def release(self, table: list[int]) -> None:
        """Let go of every block of ``table`` (emptied). A block no one else holds is free again: one without a
        key at the front of the free list, one with a key (a cached prefix) at the back."""
        # Backwards, each unkeyed block to the front: the table's first block ends first in line, as freed blocks
        # were reused before (most recently freed first: their pages are the likeliest to be in a cache).
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            assert self._refs[block] == 0, f"block {block} released more often than taken"
            self._free[block] = None
            if block not in self._key_of:
                self._free.move_to_end(block, last=False)
        table.clear()

    def free(self, seq: Sequence) -> None:
        """Let go of a request's blocks: its cache is gone (finished, cancelled, preempted, migrated away)."""
        self.release(seq.block_table)
        seq.block_hashes.clear()

    # ------------------------------------------------------------------ prefix caching

    def _evict(self, block: int) -> None:
        keyed = self._key_of.pop(block, None)
        if keyed is not None:
            del self._by_hash[keyed[0]]

    def _key(self, seq: Sequence, index: int) -> tuple[int, BlockKey]:
        start, end = index * self.block_size, (index + 1) * self.block_size
        prompt, n = seq.prompt_ids, len(seq.prompt_ids)
        if end <= n:
            ids = tuple(prompt[start:end])
        elif start >= n:
            ids = tuple(seq.generated_ids[start - n:end - n])
        else:
            ids = tuple(prompt[start:]) + tuple(seq.generated_ids[:end - n])
        prev = seq.block_hashes[index - 1] if index else salt_hash(seq.cache_salt)
        key = (prev, ids)
        return hash(key), key

    def match(self, seq: Sequence) -> int:
        """Before a request's (re)prefill (it holds no blocks): take the longest run of its leading full blocks
        that the cache holds, sharing them, and mark their tokens computed. Returns the tokens served from cache;
        :meth:`record` counts the lookup once it stands (the caller may :meth:`free` a match it cannot use yet)."""
        if not self.prefix_caching or seq.block_table:
            return 0
        # Only blocks wholly before the last token: that one is always computed, for its logits, into a block of
        # the request's own, so a shared block is never written.
        limit = (seq.n_tokens - 1) // self.block_size
        for index in range(limit):
            h, key = self._key(seq, index)
            block = self._by_hash.get(h)
            if block is None or self._key_of[block][1] != key:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        hit = len(seq.block_table) * self.block_size
        seq.num_cached = hit
        return hit

    def record(self, seq: Sequence, hit: int) -> None:
        """Count a lookup of ``seq`` that served ``hit`` of its tokens from the cache."""
        if self.prefix_caching:
            self.query_tokens += seq.n_tokens
            self.hit_tokens += hit

    def commit(self, seq: Sequence) -> None:
        """After a forward: key the request's blocks that are now full and computed, so later requests can share
        them. A key another block already holds (two requests computed the same prefix at once) stays with that
        block; this one stays private."""
        if not self.prefix_caching or len(seq.block_hashes) >= seq.num_cached // self.block_size:
            return
        full = min(seq.num_cached // self.block_size, len(seq.block_table))
        for index in range(len(seq.block_hashes), full):
            h, key = self._key(seq, index)
            seq.block_hashes.append(h)
            block = seq.block_table[index]
            if h not in self._by_hash and block not in self._key_of:
                self._by_hash[h] = block
                self._key_of[block] = (h, key)


__all__ = ["SCRATCH_BLOCK", "BlockKey", "BlockManager", "salt_hash"]
