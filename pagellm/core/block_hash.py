"""Content hashes of full KV blocks, for automatic prefix caching.

A block's KV depends on every token before it, not only on its own tokens, so the hash of
block i is chained: it mixes the hash of block i - 1, the block's token ids and an extra-keys
slot (for inputs that change the KV without changing the token ids: a LoRA adapter, a cache
salt, multimodal data). Equal hashes are only a hint; the cache confirms a match against the
stored tokens and the parent block before serving it (see kv_cache.py), so a collision costs a
miss, never wrong KV.
"""

from __future__ import annotations

from typing import Hashable, Sequence

# Extra inputs mixed into a block's hash; None when there are none.
ExtraKeys = tuple[Hashable, ...] | None


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int], extra_keys: ExtraKeys = None) -> int:
    """Hash of one full block given its parent's hash (None for the first block).

    Python's tuple hash: 64-bit, fast, and stable within a process (the cache never outlives
    one). Tests monkeypatch this module attribute to force collisions.
    """
    return hash((parent_hash, tuple(token_ids), extra_keys))


def block_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int, extra_keys: ExtraKeys = None,
                 known: list[int] | None = None) -> list[int]:
    """Chained hashes of the first `num_blocks` full blocks of `token_ids`.

    `known` (hashes of a prefix computed earlier) is extended in place and returned, so a
    growing sequence hashes each block once.
    """
    hashes = known if known is not None else []
    if num_blocks * block_size > len(token_ids):
        raise ValueError(f"num_blocks ({num_blocks}) full blocks need {num_blocks * block_size} tokens; "
                         f"got {len(token_ids)}")
    while len(hashes) < num_blocks:
        i = len(hashes)
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size], extra_keys))
    return hashes
