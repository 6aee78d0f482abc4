"""Batching invariance: a request's greedy (or seeded) output does not depend on what else is
in the batch, on chunked prefill, or on being preempted and recomputed."""

from __future__ import annotations

import random

import pytest

from pagellm import LLM, SamplingParams

NUM_PROMPTS = 32


def _prompts() -> list[dict]:
    rng = random.Random(0)
    lengths = [1, 2, 3, 5, 8, 9, 15, 16, 17, 31, 33, 47, 60] + [rng.randint(1, 60) for _ in range(NUM_PROMPTS - 13)]
    return [{"prompt_token_ids": [rng.randrange(3, 49152) for _ in range(n)]} for n in lengths]


def _greedy_params() -> list[SamplingParams]:
    # Different lengths, so requests finish at different steps and the batch keeps changing.
    return [SamplingParams(temperature=0.0, max_tokens=4 + (7 * i) % 13, ignore_eos=True) for i in range(NUM_PROMPTS)]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(tiny_llm) -> list[list[int]]:
    """Each prompt run on its own."""
    return [_tokens(tiny_llm.generate(p, sp, use_tqdm=False))[0] for p, sp in zip(_prompts(), _greedy_params())]


def _spy_on_scheduler(llm: LLM) -> list:
    """Records every SchedulerOutput the engine's scheduler returns (with the per-item sizes)."""
    scheduler = llm.llm_engine.scheduler
    original = scheduler.schedule
    steps = []

    def schedule():
        out = original()
        steps.append([(s.request.request_id, s.num_new_tokens, s.request.num_computed_tokens,
                       s.request.num_prompt_tokens) for s in out.scheduled])
        return out

    scheduler.schedule = schedule
    return steps


def test_batched_equals_alone(tiny_llm, alone) -> None:
    outputs = tiny_llm.generate(_prompts(), _greedy_params(), use_tqdm=False)
    assert [o.request_id for o in outputs] == sorted({o.request_id for o in outputs}, key=int)
    assert _tokens(outputs) == alone
    assert [len(t) for t in alone] == [sp.max_tokens for sp in _greedy_params()]
    assert tiny_llm.llm_engine.kv_cache.num_used_blocks == 0


def test_batched_equals_alone_under_preemption_and_chunking(tiny_llm, tiny_llm_dir_small_pool, alone) -> None:
    llm = tiny_llm_dir_small_pool
    steps = _spy_on_scheduler(llm)
    engine = llm.llm_engine
    before = engine.num_preemptions
    # Prompt logprobs too: a request preempted in or after its prefill must score each prompt
    # position exactly once.
    params = [sp.clone() for sp in _greedy_params()]
    for sp in params:
        sp.prompt_logprobs = 1
    outputs = llm.generate(_prompts(), params, use_tqdm=False)
    assert _tokens(outputs) == alone
    assert engine.num_preemptions > before, "the KV pool was meant to run dry"
    reference = tiny_llm.generate(_prompts(), params, use_tqdm=False)
    for ours, ref in zip(outputs, reference):
        assert len(ours.prompt_logprobs) == len(ours.prompt_token_ids)
        assert ours.prompt_logprobs[0] is None and ref.prompt_logprobs[0] is None
        for a, b in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert a.keys() == b.keys()
            assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-3) for t in a)
    budget = engine.scheduler_config.max_num_batched_tokens
    assert all(sum(n for _, n, _, _ in step) <= budget for step in steps)
    # Some prompt was split over several steps (a chunk that ends before the prompt does).
    assert any(computed + n < num_prompt for step in steps for _, n, computed, num_prompt in step)
    # Several requests shared a step (a mixed batch, not one at a time).
    assert max(len(step) for step in steps) > 4
    assert engine.kv_cache.num_used_blocks == 0
    assert not engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def tiny_llm_dir_small_pool(tiny_llama_dir) -> LLM:
    # 12 blocks of 8 tokens: 96 slots for 32 requests of up to 76 tokens; 16 tokens a step.
    return LLM(str(tiny_llama_dir), dtype="float32", block_size=8, num_gpu_blocks_override=12,
               max_num_batched_tokens=16)


def test_seeded_sampling_independent_of_batch(tiny_llm, tiny_llm_dir_small_pool) -> None:
    """A seeded request gives the same tokens alone, in a batch, and under preemption."""
    prompts = _prompts()[:8]
    seeded = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=100 + i, ignore_eos=True)
              for i in range(8)]
    alone = [_tokens(tiny_llm.generate(p, sp, use_tqdm=False))[0] for p, sp in zip(prompts, seeded)]
    # The same requests mixed with unseeded and greedy ones, in a different order.
    others = [SamplingParams(temperature=1.0, max_tokens=6), SamplingParams(temperature=0.0, max_tokens=9)] * 4
    mixed_prompts = prompts[::-1] + prompts
    mixed_params = seeded[::-1] + others
    mixed = _tokens(tiny_llm.generate(mixed_prompts, mixed_params, use_tqdm=False))[:8][::-1]
    assert mixed == alone
    small = _tokens(tiny_llm_dir_small_pool.generate(prompts, seeded, use_tqdm=False))
    assert small == alone
    # Sampling really happened: not all equal to greedy.
    greedy = _tokens(tiny_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                                       use_tqdm=False))
    assert greedy != alone


def test_top_k_1_equals_greedy(tiny_llm, alone) -> None:
    params = [SamplingParams(temperature=1.3, top_k=1, max_tokens=sp.max_tokens, ignore_eos=True)
              for sp in _greedy_params()[:8]]
    assert _tokens(tiny_llm.generate(_prompts()[:8], params, use_tqdm=False)) == alone[:8]
