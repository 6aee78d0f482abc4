"""n > 1: the sequences of one request are seeded like separate requests, and they compute
their shared prompt once (its full blocks are shared by reference count)."""

from __future__ import annotations

import random

import pytest

from pagellm import LLM, SamplingParams

VOCAB = 49152
N = 4


@pytest.fixture(scope="module")
def uncached_llm(tiny_llama_dir) -> LLM:
    """Prefix caching off: siblings share the prompt through the explicit fork alone."""
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64MiB", seed=0, enable_prefix_caching=False)


def _prompt(seed: int, length: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(length)]}


def _sampled(seed: int, n: int = 1) -> SamplingParams:
    # top_k keeps the inverse-CDF draw away from the random model's long flat tail, where
    # fp32 round-off in a 49152-wide cumsum (which differs with batch shapes) moves the pick
    # to a neighbouring token id.
    return SamplingParams(n=n, temperature=1.0, top_k=50, seed=seed, max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("prompt_len", [5, 40])
def test_n_seeded_equals_separate_seeded_requests(tiny_llm, uncached_llm, prefix_caching: bool,
                                                  prompt_len: int) -> None:
    llm = tiny_llm if prefix_caching else uncached_llm
    prompt = _prompt(100 + prompt_len + prefix_caching, prompt_len)
    out = llm.generate(prompt, _sampled(123, n=N), use_tqdm=False)[0]
    separate = [llm.generate(prompt, _sampled(123 + i), use_tqdm=False)[0].outputs[0].token_ids for i in range(N)]
    assert [c.index for c in out.outputs] == list(range(N))
    assert [c.token_ids for c in out.outputs] == separate
    assert len({tuple(t) for t in separate}) > 1, "the seeds should give different samples"
    assert llm.llm_engine.kv_cache.num_used_blocks == 0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prompt_blocks_are_computed_once_and_shared(tiny_llm, uncached_llm, prefix_caching: bool) -> None:
    llm = tiny_llm if prefix_caching else uncached_llm
    engine = llm.llm_engine
    block_size = engine.kv_cache.block_size
    prompt_len = 40  # 2 full blocks that can be shared (the third holds the last prompt token)
    shared = (prompt_len - 1) // block_size
    scheduler = engine.scheduler
    original = scheduler.schedule
    seen: list[tuple[list[list[int]], list[int]]] = []  # per step: the children's tables, ref counts

    def schedule():
        out = original()
        children = [r for r in scheduler.running if r.parent_id == "fork"]
        if len(children) == N:
            tables = [list(r.block_ids) for r in children]
            seen.append((tables, [engine.kv_cache.pool.ref_counts[b] for b in tables[0][:shared]]))
        return out

    scheduler.schedule = schedule
    try:
        before = engine.stats().prompt_tokens
        engine.add_request("fork", _prompt(7 + prefix_caching, prompt_len), _sampled(5, n=N))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        scheduler.schedule = original
    # The first child computes the whole prompt; each other one only its unshared tail.
    assert engine.stats().prompt_tokens - before == prompt_len + (N - 1) * (prompt_len - shared * block_size)
    assert seen, "the four children never ran together"
    for tables, refs in seen:
        assert all(t[:shared] == tables[0][:shared] for t in tables)
        assert refs == [N] * shared
        # Past the shared blocks each child writes its own.
        tails = [b for t in tables for b in t[shared:]]
        assert len(tails) == len(set(tails))
    assert engine.kv_cache.num_used_blocks == 0


def test_abort_of_forked_request_frees_everything(uncached_llm) -> None:
    engine = uncached_llm.llm_engine
    engine.add_request("abort-me", _prompt(9, 50), _sampled(1, n=N))
    engine.add_request("keep", _prompt(10, 20), _sampled(2))
    engine.step()  # the first child's prefill; its siblings wait for the shared blocks
    assert len(engine.scheduler.waiting) == N - 1
    engine.step()
    assert engine.kv_cache.num_used_blocks > 0
    engine.abort_request("abort-me")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache.num_used_blocks == 0
    assert all(n == 0 for n in engine.kv_cache.pool.ref_counts)
    assert not engine.scheduler.running and not engine.scheduler.waiting
