"""Bookkeeping for the paged KV cache: which fixed-size blocks each request holds.

Pure Python, no tensors: the model runner owns the cache tensor, this module only hands out
block ids. A block is free when its reference count is zero.

Automatic prefix caching: once a block is full and its KV computed, it is registered under
the chained hash of its tokens (block_hash.py). A freed cached block keeps its KV and waits
in the free queue, least recently used first; it is evicted (its hash dropped) only when a
new block is needed. A new request takes the longest run of cached blocks matching its
tokens, sharing them by reference count, and computes only the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from pagellm.core import block_hash
from pagellm.core.block_hash import ExtraKeys

if TYPE_CHECKING:
    from pagellm.engine.request import Request


class CachedBlock(NamedTuple):
    """What a cached block holds, so that a hash match can be confirmed before it is served.

    A NamedTuple (immutable, built in a quarter of a frozen dataclass's time): a prefill step of
    16k tokens registers a thousand of these on the host while the device waits."""

    block_hash: int
    token_ids: tuple[int, ...]  # the block's token ids: a tuple is built ~10x faster than packed bytes
    extra_keys: ExtraKeys
    # The parent's entry_id: a block's KV is only valid after the exact parent it was computed
    # after, and entry ids (unlike block ids) are never reused once a block is evicted.
    parent_entry: int | None
    entry_id: int


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache and tokens found there (vLLM counts tokens)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    """A fixed set of block ids with reference counts, a free queue and the prefix-cache index.

    Free blocks wait in one queue: blocks holding nothing at the front (handed out first),
    cached blocks behind them in the order they were freed, so eviction is least recently
    used. A block in use is never in the queue, so it can never be evicted.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1; got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # An ordered set: O(1) removal from the middle when a cached free block is reused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._entries: list[CachedBlock | None] = [None] * num_blocks
        # hash -> blocks with that hash (more than one when equal content was computed twice,
        # or on a collision); an ordered set so the oldest is tried first.
        self._by_hash: dict[int, dict[int, None]] = {}
        self._next_entry_id = 0
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (including cached ones that would be evicted)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return sum(len(blocks) for blocks in self._by_hash.values())

    def allocate(self, count: int) -> list[int]:
        """Takes `count` free blocks (ref count 1 each), evicting cached ones least recently used
        first. Raises RuntimeError if too few are free."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            if self._entries[block] is not None:
                self._uncache(block)
                self.num_evictions += 1
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: list[int]) -> None:
        """Adds a reference to each block, taking free (cached) ones out of the free queue."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1

    def incref(self, blocks: list[int]) -> None:
        self.touch(blocks)

    def free(self, blocks: list[int]) -> None:
        """Drops one reference from each block; blocks reaching zero go back to the free queue.

        The table is walked backwards so that a request's last blocks, the least likely to be
        shared, are evicted before its first ones.
        """
        for block in reversed(blocks):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than allocated")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if self._entries[block] is None:
                    self._free.move_to_end(block, last=False)

    # ---- prefix-cache index ---------------------------------------------------------------
    def entry(self, block: int) -> CachedBlock | None:
        return self._entries[block]

    def cache(self, block: int, block_hash_value: int, token_ids: list[int], extra_keys: ExtraKeys,
              parent_entry: int | None) -> CachedBlock:
        """Registers a full, computed block under its hash. Returns its entry."""
        entry = CachedBlock(block_hash_value, tuple(token_ids), extra_keys, parent_entry,
                            self._next_entry_id)
        self._next_entry_id += 1
        self._entries[block] = entry
        self._by_hash.setdefault(block_hash_value, {})[block] = None
        return entry

    def find(self, block_hash_value: int, token_ids: list[int], extra_keys: ExtraKeys,
             parent_entry: int | None) -> int | None:
        """A cached block with this hash whose tokens, extra keys and parent all match, or None."""
        candidates = self._by_hash.get(block_hash_value)
        if not candidates:
            return None
        tokens = tuple(token_ids)
        for block in candidates:
            entry = self._entries[block]
            if entry.parent_entry == parent_entry and entry.token_ids == tokens and entry.extra_keys == extra_keys:
                return block
        return None

    def _uncache(self, block: int) -> None:
        entry = self._entries[block]
        self._entries[block] = None
        same_hash = self._by_hash[entry.block_hash]
        del same_hash[block]
        if not same_hash:
            del self._by_hash[entry.block_hash]

    def reset_cache(self) -> bool:
        """Drops every cached block that no request holds. Returns True if the cache is now empty
        (False when some cached blocks are in use; they stay cached)."""
        for block in [b for b in self._free if self._entries[b] is not None]:
            self._uncache(block)
            self._free.move_to_end(block, last=False)
        return not self._by_hash


class KVCacheManager:
    """Gives requests the blocks their tokens need and takes them back.

    With `enable_prefix_caching`, full computed blocks are kept for reuse (see the module
    docstring). Requests forked from one prompt (`Request.fork_source`, set for n > 1) share
    that prompt's full blocks either way.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.stats = PrefixCacheStats()
        # Blocks handed out since the last take_new_blocks(); the runner may need to clear them.
        # Blocks reused from the cache or shared with a sibling are never in it: they hold KV.
        self._new_blocks: list[int] = []

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks some request holds (cached blocks nobody holds count as free)."""
        return self.pool.num_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.num_used_blocks / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_shareable_blocks(self, request: Request) -> int:
        """Full blocks a request may take from elsewhere: never the one holding its last token,
        which it must compute itself to get logits."""
        return (request.num_tokens - 1) // self.block_size

    # ---- admission ------------------------------------------------------------------------
    def find_computed_blocks(self, request: Request) -> list[int] | None:
        """Blocks whose KV a new (or preempted) request can reuse, from the start of its tokens.

        Looks up the prefix cache, and the fork source's computed prompt blocks for a forked
        request. Returns None when no lookup applies (caching off and no fork source), which
        keeps the request out of the hit statistics. Changes nothing.
        """
        if request.block_ids:
            raise RuntimeError(f"request {request.request_id} already holds blocks")
        limit = self.num_shareable_blocks(request)
        found: list[int] | None = None
        # Prompt logprobs are computed from the prompt's hidden states: a request that asks for
        # them must compute its whole prompt.
        if self.enable_prefix_caching and request.sampling_params.prompt_logprobs is None:
            found = self._lookup(request, limit)
        source = request.fork_source
        if source is not None and source.block_ids and not source.is_finished:
            shared = min(limit, source.num_computed_tokens // self.block_size, len(source.block_ids))
            if found is None or shared > len(found):
                found = source.block_ids[:shared]
        return found

    def _lookup(self, request: Request, limit: int) -> list[int]:
        if limit == 0:
            return []
        bs = self.block_size
        tokens = request.all_token_ids
        hashes = self._hashes(request, limit, tokens)
        blocks: list[int] = []
        parent_entry: int | None = None
        for i in range(limit):
            block = self.pool.find(hashes[i], tokens[i * bs:(i + 1) * bs], request.cache_extra_keys, parent_entry)
            if block is None:
                break
            blocks.append(block)
            parent_entry = self.pool.entry(block).entry_id
        return blocks

    def uncomputed_block_hashes(self, request: Request) -> list[int]:
        """Hashes of the shareable full blocks the request has still to compute (none with caching off).

        The scheduler holds back a new request whose next block is among those of a request
        already computing it, so that a burst of requests with one system prompt computes it once.
        """
        if not self.enable_prefix_caching:
            return []
        first = request.num_computed_tokens // self.block_size
        last = self.num_shareable_blocks(request)
        if last <= first:
            return []
        return self._hashes(request, last, request.all_token_ids)[first:last]

    def next_block_hash(self, request: Request, num_computed_blocks: int) -> int | None:
        """The hash of the first block a request would compute after `num_computed_blocks` found
        ones, or None when that block is not shareable (or caching is off)."""
        if not self.enable_prefix_caching or num_computed_blocks >= self.num_shareable_blocks(request):
            return None
        return self._hashes(request, num_computed_blocks + 1, request.all_token_ids)[num_computed_blocks]

    def _hashes(self, request: Request, num_blocks: int, tokens: list[int]) -> list[int]:
        return block_hash.block_hashes(tokens, self.block_size, num_blocks, request.cache_extra_keys,
                                       known=request.block_hashes)

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Grows `request.block_ids` to hold its computed tokens plus `num_new_tokens`.

        `computed_blocks` (from find_computed_blocks, for a request holding no blocks yet) are
        taken first and counted as computed: `num_new_tokens` then counts tokens after them.
        Returns False, changing nothing, when the pool has too few free blocks.
        """
        computed = computed_blocks or []
        if computed and request.block_ids:
            raise RuntimeError(f"request {request.request_id} already holds blocks")
        num_computed = request.num_computed_tokens + len(computed) * self.block_size
        needed = self.blocks_for(num_computed + num_new_tokens) - len(request.block_ids) - len(computed)
        # Taking a cached block nobody holds removes it from the free queue.
        reclaimed = sum(1 for b in computed if self.pool.ref_counts[b] == 0)
        if max(needed, 0) > self.pool.num_free_blocks - reclaimed:
            return False
        if computed_blocks is not None:
            if self.enable_prefix_caching:
                self.stats.queries += request.num_tokens
                self.stats.hits += len(computed) * self.block_size
            if request.num_preemptions == 0:  # as vLLM reports it: the first admission's hit
                request.num_cached_tokens = len(computed) * self.block_size
        if computed:
            self.pool.touch(computed)
            request.block_ids.extend(computed)
            request.num_computed_tokens = num_computed
            request.num_cached_blocks = len(computed)
        if needed > 0:
            blocks = self.pool.allocate(needed)
            request.block_ids.extend(blocks)
            self._new_blocks.extend(blocks)
        return True

    # ---- caching --------------------------------------------------------------------------
    def cache_full_blocks(self, request: Request) -> None:
        """Registers the request's blocks that are full and computed (idempotent, cheap when
        nothing changed). The scheduler calls it for running requests before each step and
        for every request whose blocks it frees."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # Capped by the known tokens: with asynchronous steps a position may be computed from a
        # sampled token whose value the host has not read yet.
        num_full = min(request.num_computed_tokens, request.num_tokens) // bs
        start = request.num_cached_blocks
        if num_full <= start:
            return
        tokens = request.all_token_ids
        hashes = self._hashes(request, num_full, tokens)
        parent_entry: int | None = None
        if start > 0:
            parent = self.pool.entry(request.block_ids[start - 1])
            if parent is None:  # the chain was cut (the cache was reset): nothing after it is findable
                request.num_cached_blocks = num_full
                return
            parent_entry = parent.entry_id
        for i in range(start, num_full):
            block = request.block_ids[i]
            entry = self.pool.entry(block)
            if entry is None:
                entry = self.pool.cache(block, hashes[i], tokens[i * bs:(i + 1) * bs], request.cache_extra_keys,
                                        parent_entry)
            parent_entry = entry.entry_id
        request.num_cached_blocks = num_full

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block no request holds; True if the cache is now empty."""
        return self.pool.reset_cache()

    def take_new_blocks(self) -> list[int]:
        """Blocks allocated since the last call (and clears the record)."""
        blocks, self._new_blocks = self._new_blocks, []
        return blocks

    def free(self, request: Request) -> None:
        """Returns all of a request's blocks to the pool, caching its full computed ones first."""
        self.cache_full_blocks(request)
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_cached_blocks = 0
