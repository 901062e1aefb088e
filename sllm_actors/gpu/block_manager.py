"""The paged KV cache's bookkeeping: which fixed-size blocks of the pool each request holds.

The pool itself (the tensors) belongs to :class:`~sllm_actors.gpu.runner.ModelRunner`; this only hands out
block numbers. Block 0 is never handed out: padded rows of a captured decode step write their keys and
values there, so padding can never touch a live request's cache.
"""

from __future__ import annotations

from collections import deque

SCRATCH_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(SCRATCH_BLOCK + 1, num_blocks))

    @property
    def capacity_blocks(self) -> int:
        """Blocks a request may ever hold (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.capacity_blocks - len(self._free)

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
            table.append(self._free.popleft())
        return True

    def release(self, table: list[int]) -> None:
        # Most recently freed first: their pages are the likeliest to still be in a cache.
        self._free.extendleft(reversed(table))
        table.clear()


__all__ = ["SCRATCH_BLOCK", "BlockManager"]
