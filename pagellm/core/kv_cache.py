"""Bookkeeping for the paged KV cache: which fixed-size blocks each request holds.

Pure Python, no tensors: the model runner owns the cache tensor, this module only hands out
block ids. A block is free when its reference count is zero.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagellm.engine.request import Request


class BlockPool:
    """A fixed set of block ids with reference counts and a free list."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1; got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Takes `count` free blocks (ref count 1 each). Raises RuntimeError if too few are free."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self.ref_counts[block] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for block in blocks:
            self.ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops one reference from each block; blocks reaching zero go back to the free list."""
        for block in reversed(blocks):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than allocated")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)


class KVCacheManager:
    """Gives requests the blocks their tokens need and takes them back."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        # Blocks handed out since the last take_new_blocks(); the runner may need to clear them.
        self._new_blocks: list[int] = []

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.num_used_blocks / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grows `request.block_ids` to hold its computed tokens plus `num_new_tokens`.

        Returns False, changing nothing, when the pool has too few free blocks.
        """
        needed = self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        if needed <= 0:
            return True
        if needed > self.pool.num_free_blocks:
            return False
        blocks = self.pool.allocate(needed)
        request.block_ids.extend(blocks)
        self._new_blocks.extend(blocks)
        return True

    def take_new_blocks(self) -> list[int]:
        """Blocks allocated since the last call (and clears the record)."""
        blocks, self._new_blocks = self._new_blocks, []
        return blocks

    def free(self, request: Request) -> None:
        """Returns all of a request's blocks to the pool."""
        self.pool.free(request.block_ids)
        request.block_ids = []
