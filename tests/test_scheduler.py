"""The scheduler on its own (no model): token budget, chunked prefill, decode-first order,
preemption that neither loses nor duplicates a request, and no leaked blocks."""

from __future__ import annotations

import random

import pytest

from pagellm import SamplingParams
from pagellm.config import SchedulerConfig
from pagellm.core.kv_cache import KVCacheManager
from pagellm.core.scheduler import Scheduler, SchedulerOutput
from pagellm.engine.request import Request, RequestStatus

FAKE_TOKEN = 7


def _request(rid: str, num_prompt: int, max_tokens: int) -> Request:
    return Request(rid, None, [5] * num_prompt, SamplingParams(max_tokens=max_tokens), {2}, max_model_len=4096)


def _make(num_blocks: int, block_size: int = 4, budget: int = 32, max_num_seqs: int = 256,
          chunked: bool = True, max_model_len: int = 4096) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                             enable_chunked_prefill=chunked)
    return Scheduler(config, KVCacheManager(num_blocks, block_size))


def _check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids)), f"a request was scheduled twice in one step: {ids}"
    assert out.num_tokens <= sched.config.max_num_batched_tokens
    assert len(sched.running) <= sched.config.max_num_seqs
    assert all(s.num_new_tokens >= 1 for s in out.scheduled)
    running, waiting = {r.request_id for r in sched.running}, {r.request_id for r in sched.waiting}
    assert not running & waiting, "a request is both running and waiting"
    block_size = sched.kv_cache.block_size
    for s in out.scheduled:
        r = s.request
        assert r.status == RequestStatus.RUNNING and r.request_id in running
        # Its block table covers every token it will have computed after this step.
        assert len(r.block_ids) * block_size >= r.num_computed_tokens + s.num_new_tokens
        assert r.num_computed_tokens + s.num_new_tokens <= r.num_tokens
    held = [b for r in sched.running for b in r.block_ids]
    assert len(held) == len(set(held)), "two running requests share a block"
    assert not any(r.block_ids for r in sched.waiting), "a waiting request holds blocks"
    assert sched.kv_cache.num_used_blocks == len(held)


def _apply(sched: Scheduler, out: SchedulerOutput) -> list[Request]:
    """What the engine does after the forward pass: advance, sample, finish. Returns finished ones.

    Records on `out.sampled` which scheduled requests sampled (a property read before advancing).
    """
    done = []
    out.sampled = [s.samples for s in out.scheduled]
    for s in out.scheduled:
        r = s.request
        samples = s.samples
        r.num_computed_tokens += s.num_new_tokens
        if samples:
            r.output_token_ids.append(FAKE_TOKEN)
            if len(r.output_token_ids) >= r.max_tokens:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
                done.append(r)
    return done


def _run(sched: Scheduler, requests: list[Request], max_steps: int = 10_000) -> list[SchedulerOutput]:
    for r in requests:
        sched.add_request(r)
    finished: list[Request] = []
    steps = []
    for _ in range(max_steps):
        if not sched.num_unfinished:
            break
        out = sched.schedule()
        _check_invariants(sched, out)
        assert not out.is_empty, "the scheduler stalled with work left"
        steps.append(out)
        finished += _apply(sched, out)
        # Every request is in exactly one place: running, waiting or finished.
        places = [r.request_id for r in sched.running] + [r.request_id for r in sched.waiting] + \
            [r.request_id for r in finished]
        assert sorted(places) == sorted(r.request_id for r in requests)
    else:
        pytest.fail("did not finish")
    ids = [r.request_id for r in finished]
    assert sorted(ids) == sorted(r.request_id for r in requests), "a request was lost or finished twice"
    assert all(len(r.output_token_ids) == r.max_tokens for r in requests)
    assert sched.kv_cache.num_used_blocks == 0
    return steps


def test_token_budget_respected_and_everything_finishes() -> None:
    sched = _make(num_blocks=400, budget=20)
    rng = random.Random(0)
    requests = [_request(str(i), rng.randint(1, 50), rng.randint(1, 12)) for i in range(30)]
    steps = _run(sched, requests)
    assert max(s.num_tokens for s in steps) == 20  # the budget is used, not just respected


def test_chunked_prefill_splits_as_configured() -> None:
    sched = _make(num_blocks=100, budget=16)
    r = _request("long", 50, 3)
    steps = _run(sched, [r])
    chunks = [s.scheduled[0].num_new_tokens for s in steps]
    # 50 prompt tokens in chunks of 16 (the last samples the first token), then 2 decodes.
    assert chunks == [16, 16, 16, 2, 1, 1]
    assert [s.sampled[0] for s in steps] == [False, False, False, True, True, True]


def test_no_chunking_when_disabled() -> None:
    sched = _make(num_blocks=100, budget=64, chunked=False, max_model_len=64)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=16, max_model_len=64, enable_chunked_prefill=False)
    a, b = _request("a", 40, 2), _request("b", 40, 2)
    steps = _run(sched, [a, b])
    # b does not fit next to a in one step, and is not split: it waits for the next step.
    assert [(s.request.request_id, s.num_new_tokens) for s in steps[0].scheduled] == [("a", 40)]
    assert ("b", 40) in [(s.request.request_id, s.num_new_tokens) for s in steps[1].scheduled]


def test_decodes_first_then_prefill_of_waiting_requests() -> None:
    sched = _make(num_blocks=100, budget=10)
    first = _request("first", 4, 5)
    sched.add_request(first)
    out = sched.schedule()
    _apply(sched, out)
    second = _request("second", 30, 5)
    sched.add_request(second)
    out = sched.schedule()
    _check_invariants(sched, out)
    # The running request's decode token comes first; the rest of the budget prefills the new one.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("first", 1), ("second", 9)]
    assert out.num_tokens == 10


def test_max_num_seqs_caps_running_requests() -> None:
    sched = _make(num_blocks=400, budget=100, max_num_seqs=3)
    requests = [_request(str(i), 3, 4) for i in range(7)]
    steps = _run(sched, requests)
    assert max(len(s.scheduled) for s in steps) == 3


def test_preemption_neither_loses_nor_duplicates() -> None:
    # 12 blocks of 4 tokens = 48 slots; 10 requests that need up to 32 each.
    sched = _make(num_blocks=12, block_size=4, budget=24)
    rng = random.Random(1)
    requests = [_request(str(i), rng.randint(2, 20), rng.randint(4, 12)) for i in range(10)]
    steps = _run(sched, requests)
    preempted = [r for s in steps for r in s.preempted]
    assert preempted, "the pool was meant to run dry"
    assert all(r.num_preemptions >= 1 for r in set(preempted))
    # A preempted request keeps its outputs and recomputes them (prompt + outputs) later.
    assert sum(r.num_preemptions for r in requests) == len(preempted)


def test_preempted_request_recomputes_prompt_and_outputs() -> None:
    sched = _make(num_blocks=5, block_size=4, budget=64)
    old, new = _request("old", 8, 10), _request("new", 8, 10)
    sched.add_request(old)
    sched.add_request(new)
    # Both prefill (4 blocks), then decode until the pool runs dry and "new" is preempted.
    while True:
        out = sched.schedule()
        _check_invariants(sched, out)
        if out.preempted:
            break
        _apply(sched, out)
    assert out.preempted == [new]
    assert new.status == RequestStatus.PREEMPTED and new.block_ids == [] and new.num_computed_tokens == 0
    assert sched.waiting[0] is new
    outputs_before = list(new.output_token_ids)
    assert outputs_before, "it had generated tokens before being preempted"
    _apply(sched, out)
    # Once "old" finishes, "new" comes back and recomputes everything it had, then samples.
    while new.status != RequestStatus.RUNNING:
        out = sched.schedule()
        _check_invariants(sched, out)
        _apply(sched, out)
    item = next(s for s in out.scheduled if s.request is new)
    assert item.num_new_tokens == 8 + len(outputs_before)
    assert new.output_token_ids[:len(outputs_before)] == outputs_before


def test_finish_and_abort_free_blocks_from_any_queue() -> None:
    sched = _make(num_blocks=20, budget=8)
    a, b = _request("a", 12, 5), _request("b", 12, 5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()  # a gets 8 tokens (a chunk); b waits
    _apply(sched, out)
    assert a.block_ids and not b.block_ids
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert sched.num_unfinished == 0
    assert sched.kv_cache.num_used_blocks == 0
    assert a.is_finished and a.finish_reason == "abort"
    assert sched.schedule().is_empty
