"""The paged KV cache's bookkeeping: block pool, per-request block tables, no leaks."""

from __future__ import annotations

import pytest

from pagellm import SamplingParams
from pagellm.core.kv_cache import BlockPool, KVCacheManager
from pagellm.engine.request import Request


def _request(num_prompt: int, rid: str = "r") -> Request:
    return Request(rid, None, list(range(num_prompt)), SamplingParams(max_tokens=8), {2}, max_model_len=1024)


# ---- BlockPool ----------------------------------------------------------------------------------
def test_pool_allocates_distinct_blocks_and_frees_them() -> None:
    pool = BlockPool(6)
    a = pool.allocate(4)
    assert len(set(a)) == 4 and all(0 <= b < 6 for b in a)
    assert pool.num_free_blocks == 2
    assert all(pool.ref_counts[b] == 1 for b in a)
    b = pool.allocate(2)
    assert not set(a) & set(b)
    assert pool.num_free_blocks == 0
    pool.free(a)
    assert pool.num_free_blocks == 4
    assert sorted(pool.allocate(4)) == sorted(a)


def test_pool_refuses_more_than_it_has_and_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_pool_ref_counts() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.incref(blocks)  # shared by a second owner
    pool.free(blocks)
    assert pool.num_free_blocks == 2, "a block still referenced must not be free"
    pool.free(blocks)
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError):
        pool.free(blocks)  # double free


def test_pool_size_is_validated() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


# ---- KVCacheManager -------------------------------------------------------------------------------
def test_allocate_slots_grows_block_table_as_tokens_arrive() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = _request(10)
    assert kv.blocks_for(0) == 0 and kv.blocks_for(1) == 1 and kv.blocks_for(4) == 1 and kv.blocks_for(5) == 2
    assert kv.allocate_slots(r, 6)  # chunk 1: tokens 0..5 -> 2 blocks
    assert len(r.block_ids) == 2
    first = list(r.block_ids)
    r.num_computed_tokens = 6
    assert kv.allocate_slots(r, 2)  # tokens 6..7 fit in block 2
    assert r.block_ids == first
    assert kv.allocate_slots(r, 3)  # tokens 6..8 -> 3 blocks, the first two kept
    assert r.block_ids[:2] == first and len(r.block_ids) == 3
    assert sorted(kv.take_new_blocks()) == sorted(r.block_ids)
    assert kv.take_new_blocks() == []
    assert kv.num_used_blocks == 3 and kv.usage == pytest.approx(0.3)
    kv.free(r)
    assert r.block_ids == [] and kv.num_used_blocks == 0


def test_allocate_slots_fails_without_side_effects() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a, b = _request(8, "a"), _request(8, "b")
    assert kv.allocate_slots(a, 8)
    assert not kv.allocate_slots(b, 8)
    assert b.block_ids == [] and kv.num_free_blocks == 1
    assert kv.allocate_slots(b, 4)
    assert not set(a.block_ids) & set(b.block_ids)


def test_requests_never_share_blocks_and_all_return() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=8)
    requests = [_request(5 + 7 * i, str(i)) for i in range(8)]
    for r in requests:
        assert kv.allocate_slots(r, r.num_prompt_tokens)
        assert len(r.block_ids) == kv.blocks_for(r.num_prompt_tokens)
    held = [b for r in requests for b in r.block_ids]
    assert len(held) == len(set(held)) == kv.num_used_blocks
    for r in requests:
        kv.free(r)
    assert kv.num_used_blocks == 0
    assert all(c == 0 for c in kv.pool.ref_counts)


# ---- through the engine ------------------------------------------------------------------------
def test_engine_leaks_no_block_after_finish_or_abort(tiny_llm) -> None:
    engine = tiny_llm.llm_engine
    assert engine.kv_cache.num_used_blocks == 0
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"leak-{i}", {"prompt_token_ids": list(range(10, 10 + 3 * i + 1))}, params)
    # A few steps in: some requests are mid-generation, holding blocks.
    for _ in range(3):
        engine.step()
    assert engine.kv_cache.num_used_blocks > 0
    engine.abort_request(["leak-1", "leak-4"])
    engine.abort_request("no-such-request")  # unknown ids are ignored
    finished = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.add(out.request_id)
    assert finished == {"leak-0", "leak-2", "leak-3", "leak-5"}
    assert engine.kv_cache.num_used_blocks == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.runner.generators == {}
