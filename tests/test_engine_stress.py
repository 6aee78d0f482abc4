"""Seeded randomized stress test of the engine core: a tiny KV pool (so requests are preempted and
prefix-cache blocks evicted), a small token budget (chunked prefill) and a mix of requests that
arrive over time and are aborted at random steps.

The mix: prompts sharing multi-block prefixes (prefix-cache hits), identical prompts, prompts of
1 token up to several blocks, lengths on and just off block boundaries; greedy and sampled
requests, seeded and not; n > 1 with and without seeds; stop strings and stop_token_ids;
max_tokens 1; logprobs and prompt_logprobs; streamed and final-only outputs. Aborts hit a request
still waiting, a preempted one, a running one, an n > 1 request with some children done, and one
right after it finished (a no-op); the last two ids are then used again at once for a new request.

Checked after every step: no request is duplicated or lost from the queues, block reference
counts equal the block tables of the live requests, a block shared by several requests is full
and computed in each of them, streamed outputs only grow, no output after a request finished or
was aborted. At the end: every request that was not aborted finished exactly once with n
outputs, no block is in use (cached blocks nobody holds count as free: num_used_blocks is 0 and
every block is back in the free queue), the whole pool can still be handed to one request, and
greedy and seeded requests (README: seeds are "reproducible whatever else is in the batch")
produce exactly what they produce alone in a fresh engine with a large pool and no prefix cache.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.request import RequestStatus

VOCAB = 49152
BLOCK_SIZE = 8
NUM_BLOCKS = 12          # 96 token slots; one request needs up to 48 of them
MAX_BATCHED_TOKENS = 16
MAX_NUM_SEQS = 6
NUM_REQUESTS = 34


@dataclass
class Spec:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrive: int            # step before which it is added
    stream: bool
    deterministic: bool    # greedy or seeded: comparable with the reference
    key: str = ""          # bookkeeping name; differs from rid when a freed id is used again

    def __post_init__(self) -> None:
        self.key = self.key or self.rid


@dataclass
class Run:
    """What the driver saw."""

    finished: dict[str, object] = field(default_factory=dict)
    last_stream: dict[str, object] = field(default_factory=dict)
    aborted: dict[str, str] = field(default_factory=dict)  # key -> how (waiting, running, ...)
    again: list[Spec] = field(default_factory=list)  # requests added under an id freed just before
    steps: int = 0


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _make_prompts(rng: random.Random) -> list[list[int]]:
    prefixes = [_random_tokens(rng, 9), _random_tokens(rng, 16), _random_tokens(rng, 27)]
    prompts: list[list[int]] = []
    # Lengths around block boundaries, 1 token, several blocks.
    for n in (1, 7, 8, 9, 15, 16, 17, 24, 33):
        prompts.append(_random_tokens(rng, n))
    while len(prompts) < NUM_REQUESTS:
        kind = rng.random()
        if kind < 0.45:
            prefix = rng.choice(prefixes)
            prompts.append(prefix + _random_tokens(rng, rng.choice([0, 1, 3, 4, 7, 8, 12])))
        elif kind < 0.6 and prompts:
            other = rng.choice(prompts)
            # The same prompt again, or a (block-aligned or not) prefix of it.
            prompts.append(list(other) if rng.random() < 0.5 else other[:max(1, rng.randint(1, len(other)))])
        else:
            prompts.append(_random_tokens(rng, rng.randint(1, 30)))
    rng.shuffle(prompts)
    return prompts


def _make_params(rng: random.Random, i: int, prompt_len: int) -> tuple[SamplingParams, bool, str]:
    """Params for request i, whether its outputs are deterministic, and which stop to derive."""
    room = min(48 - prompt_len, 20)  # each request fits the pool alone: prompt + max_tokens <= 48
    max_tokens = 1 if i % 9 == 0 else rng.randint(1, max(1, room))
    kind = i % 8
    stop = ""
    common = dict(max_tokens=max_tokens)
    if kind == 0:
        p = SamplingParams(temperature=0.0, ignore_eos=True, **common)
    elif kind == 1:
        p = SamplingParams(temperature=0.0, logprobs=2, **common)
        stop = "token"
    elif kind == 2:
        p = SamplingParams(temperature=0.0, ignore_eos=True, **common)
        stop = "string"
    elif kind == 3:
        p = SamplingParams(temperature=0.0, ignore_eos=True, prompt_logprobs=2, **common)
    elif kind == 4:
        p = SamplingParams(temperature=0.9, top_k=40, seed=1000 + i, n=rng.choice([1, 2, 3]), ignore_eos=True,
                           logprobs=rng.choice([None, 1]), **common)
        stop = rng.choice(["", "token", "string"])
    elif kind == 5:
        p = SamplingParams(temperature=1.0, n=rng.choice([1, 2]), stop=["e"], **common)  # unseeded
    elif kind == 6:
        # n > 1 with prompt logprobs: the siblings share the first one's prompt blocks.
        p = SamplingParams(temperature=1.0, seed=3000 + i, n=2, ignore_eos=True, prompt_logprobs=1, **common)
    else:
        p = SamplingParams(temperature=0.7, top_p=0.9, seed=2000 + i, ignore_eos=True, prompt_logprobs=1,
                           min_tokens=min(2, max_tokens), **common)
    deterministic = p.temperature == 0.0 or p.seed is not None
    return p, deterministic, stop if deterministic else ""


def _derive_stop(rng: random.Random, params: SamplingParams, probe, stop: str) -> SamplingParams:
    """Adds a stop token or string taken from the request's own unstopped output, so it fires."""
    params = params.clone()
    completion = probe.outputs[-1]
    if stop == "token" and completion.token_ids:
        params.stop_token_ids = [rng.choice(completion.token_ids)]
    elif stop == "string":
        text = completion.text
        if len(text.strip()) >= 2:
            start = rng.randrange(len(text) - 1)
            params.stop = [text[start:start + rng.randint(1, 3)]]
            params.include_stop_str_in_output = rng.random() < 0.5
        else:
            params.stop = ["e"]
    return params


def _make_specs(seed: int, reference: LLM) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i, prompt in enumerate(_make_prompts(rng)):
        params, deterministic, stop = _make_params(rng, i, len(prompt))
        if stop:
            probe = reference.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
            params = _derive_stop(rng, params, probe, stop)
        arrive = 0 if i < 10 else rng.randint(0, 60)
        specs.append(Spec(f"s{i}", prompt, params, arrive, stream=rng.random() < 0.6, deterministic=deterministic))
    return specs


# ---- invariants -------------------------------------------------------------------------------
def _check_engine(engine) -> None:
    """The scheduler's queues and the block pool agree with each other after a step."""
    sched, kv = engine.scheduler, engine.kv_cache
    pool = kv.pool
    live = list(sched.running) + list(sched.waiting)
    ids = [r.request_id for r in live]
    assert len(ids) == len(set(ids)), f"a request is queued twice: {ids}"
    assert len(sched.running) <= engine.scheduler_config.max_num_seqs
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING, (r.request_id, r.status)
        assert len(r.block_ids) >= kv.blocks_for(r.num_computed_tokens), r.request_id
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), (r.request_id, r.status)
        assert r.block_ids == [] and r.num_computed_tokens == 0, r.request_id
    # Every unfinished child of a known request is queued; every queued request is known.
    unfinished = {c.request_id for children in engine.groups.values() for c in children if not c.is_finished}
    assert unfinished == set(ids), f"lost: {unfinished - set(ids)}, unknown: {set(ids) - unfinished}"
    for children in engine.groups.values():
        for c in children:
            if c.is_finished:
                assert c.block_ids == [], c.request_id
    # Reference counts are exactly the live block tables.
    holders = Counter(b for r in live for b in r.block_ids)
    for r in live:
        assert len(set(r.block_ids)) == len(r.block_ids), f"{r.request_id} holds a block twice"
    assert [pool.ref_counts[b] for b in range(pool.num_blocks)] == [holders.get(b, 0) for b in range(pool.num_blocks)]
    assert set(pool._free) == {b for b in range(pool.num_blocks) if holders.get(b, 0) == 0}
    assert kv.num_used_blocks == len(holders)
    # A block several requests hold is full and computed in each: nobody writes into a shared block.
    for r in live:
        for i, b in enumerate(r.block_ids):
            if holders[b] > 1:
                assert (i + 1) * kv.block_size <= r.num_computed_tokens, \
                    f"{r.request_id} shares block {b} (index {i}) but has computed {r.num_computed_tokens} tokens"
    # Cached entries point at blocks either in use or waiting in the free queue to be evicted.
    for h, blocks in pool._by_hash.items():
        for b in blocks:
            assert pool.entry(b) is not None and pool.entry(b).block_hash == h


def _check_idle(engine) -> None:
    kv = engine.kv_cache
    assert not engine.has_unfinished_requests()
    assert engine.groups == {} and engine.final_only == set()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    # Cached blocks nobody holds are free (evictable) and not counted as used.
    assert kv.num_used_blocks == 0
    assert all(n == 0 for n in kv.pool.ref_counts)
    assert kv.num_free_blocks == kv.num_blocks
    assert engine.runner.generators == {}


def _tokens(completion) -> list[int]:
    return list(completion.token_ids)


# ---- the driver --------------------------------------------------------------------------------
def _drive(engine, specs: list[Spec], seed: int) -> Run:
    rng = random.Random(seed + 7)
    run = Run()
    by_key = {s.key: s for s in specs}
    key_of: dict[str, str] = {}  # request id -> the key of the request now using it
    pending = sorted(specs, key=lambda s: s.arrive)
    added: set[str] = set()
    wanted = {"waiting", "preempted", "running", "partly-finished", "after-finish"}

    def add(s: Spec) -> None:
        engine.add_request(s.rid, {"prompt_token_ids": s.prompt}, s.params, stream=s.stream)
        key_of[s.rid] = s.key
        added.add(s.key)

    def abort(rid: str, how: str, again: bool = False) -> None:
        engine.abort_request(rid)
        run.aborted.setdefault(key_of[rid], how)
        wanted.discard(how)
        if again:  # the same request once more, under the id just freed
            s = replace(by_key[key_of[rid]], key=key_of[rid] + "+again")
            by_key[s.key] = s
            run.again.append(s)
            add(s)

    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].arrive <= step:
            add(pending.pop(0))
        outputs = engine.step()
        step += 1
        assert step < 3000, "the engine stopped making progress"
        _check_engine(engine)
        just_finished = []
        for out in outputs:
            rid = key_of[out.request_id]
            s = by_key[rid]
            assert rid in added, rid
            assert rid not in run.finished, f"{rid} reported after it finished"
            assert rid not in run.aborted, f"{rid} reported after it was aborted"
            assert out.request_id == s.rid and len(out.outputs) == s.params.n
            assert [c.index for c in out.outputs] == list(range(s.params.n))
            if not s.stream:
                assert out.finished, f"final-only {rid} streamed"
            previous = run.last_stream.get(rid)
            for i, c in enumerate(out.outputs):
                assert len(c.token_ids) <= s.params.max_tokens
                if previous is not None:
                    before = _tokens(previous.outputs[i])
                    assert _tokens(c)[:len(before)] == before, f"{rid} output {i} changed its past tokens"
            run.last_stream[rid] = out
            if out.finished:
                assert all(c.finish_reason in ("stop", "length") for c in out.outputs), \
                    [c.finish_reason for c in out.outputs]
                run.finished[rid] = out
                just_finished.append(rid)

        # Aborts: the required kinds when the chance first comes, then a few at random.
        sched = engine.scheduler
        if "after-finish" in wanted and just_finished:
            abort(by_key[just_finished[0]].rid, "after-finish", again=True)  # a no-op: it already finished
        if "preempted" in wanted:
            victims = [r.parent_id for r in sched.waiting if r.status == RequestStatus.PREEMPTED]
            if victims:
                abort(victims[0], "preempted")
        if "waiting" in wanted and step >= 3:
            victims = [r.parent_id for r in sched.waiting
                       if r.status == RequestStatus.WAITING and r.num_computed_tokens == 0]
            if victims:
                abort(victims[-1], "waiting")
        if "running" in wanted and step >= 5:
            victims = [r.parent_id for r in sched.running if r.output_token_ids]
            if victims:
                abort(victims[0], "running", again=True)
        if "partly-finished" in wanted:
            victims = [rid for rid, children in engine.groups.items()
                       if any(c.is_finished for c in children) and not all(c.is_finished for c in children)]
            if victims:
                abort(victims[0], "partly-finished")
        if engine.groups and rng.random() < 0.04:
            abort(rng.choice(sorted(engine.groups)), "random")
        if rng.random() < 0.05:
            engine.abort_request("no-such-request")  # unknown ids are ignored
            if pending and rng.random() < 0.5:
                # Aborting a request before it is added: ignored, it is added later as usual.
                engine.abort_request(pending[-1].rid)
        _check_engine(engine)
    run.steps = step
    assert added == set(by_key)
    assert not wanted, f"abort cases never came up: {wanted}"
    return run


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_llm(tiny_llama_dir: Path) -> LLM:
    """A large pool and no prefix cache: each request run alone here is the expected output."""
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64MiB", seed=0, enable_prefix_caching=False)


def _stress_llm(folder: Path) -> LLM:
    return LLM(str(folder), dtype="float32", block_size=BLOCK_SIZE, num_gpu_blocks_override=NUM_BLOCKS,
               max_num_batched_tokens=MAX_BATCHED_TOKENS, max_num_seqs=MAX_NUM_SEQS, seed=0)


def _assert_close_logprobs(ours, ref, what: str) -> None:
    assert len(ours) == len(ref), what
    for pos, (a, b) in enumerate(zip(ours, ref)):
        if a is None or b is None:
            assert a is None and b is None, f"{what} position {pos}"
            continue
        assert a.keys() == b.keys(), f"{what} position {pos}"
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-3), f"{what} position {pos} token {t}"
            assert a[t].rank == b[t].rank or abs(a[t].logprob - b[t].logprob) < 1e-3


def _stress(tiny_llama_dir: Path, reference_llm: LLM, seed: int) -> None:
    specs = _make_specs(seed, reference_llm)
    expected = {s.rid: reference_llm.generate({"prompt_token_ids": s.prompt}, s.params, use_tqdm=False)[0]
                for s in specs if s.deterministic}
    llm = _stress_llm(tiny_llama_dir)
    engine = llm.llm_engine
    run = _drive(engine, specs, seed)
    _check_idle(engine)
    assert len(run.again) == 2
    for s in run.again:
        if s.deterministic:
            expected[s.key] = expected[s.rid]
    specs = specs + run.again
    stats = engine.stats()
    assert stats.num_preemptions > 0, "the KV pool was meant to run dry"
    assert stats.prefix_cache_hits > 0 and engine.kv_cache.pool.num_evictions > 0

    for s in specs:
        how = run.aborted.get(s.key)
        if how is None or how == "after-finish":
            assert s.key in run.finished, f"{s.key} never finished"
        elif s.key in run.finished:
            # Aborted in the same step that finished it (random abort): it finished first.
            assert how == "random"
        out = run.finished.get(s.key) or run.last_stream.get(s.key)
        if out is None:
            continue
        done = s.key in run.finished
        for c in out.outputs:
            if done:
                n = len(c.token_ids)
                if c.finish_reason == "length":
                    assert n == s.params.max_tokens
                assert n >= min(s.params.min_tokens, s.params.max_tokens) and n >= 1
        if not s.deterministic:
            continue
        ref = expected[s.key]
        for c, r in zip(out.outputs, ref.outputs):
            what = f"{s.key} (seed {seed}) output {c.index}"
            if done:
                assert _tokens(c) == _tokens(r), what
                assert (c.finish_reason, c.stop_reason, c.text) == (r.finish_reason, r.stop_reason, r.text), what
                if s.params.logprobs is not None:
                    _assert_close_logprobs(c.logprobs, r.logprobs, what)
            else:  # aborted: what it streamed before is a prefix of the expected output
                assert _tokens(r)[:len(c.token_ids)] == _tokens(c), what
        if done and s.params.prompt_logprobs is not None:
            _assert_close_logprobs(out.prompt_logprobs, ref.prompt_logprobs, f"{s.key} prompt logprobs")

    # The pool is whole again: one request can take every block (evicting whatever is cached).
    prompt = _random_tokens(random.Random(seed), NUM_BLOCKS * BLOCK_SIZE - 1)
    big = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    assert len(big[0].outputs[0].token_ids) == 1
    _check_idle(engine)


@pytest.mark.parametrize("seed", [0, 1])
def test_engine_stress(tiny_llama_dir: Path, reference_llm: LLM, seed: int) -> None:
    _stress(tiny_llama_dir, reference_llm, seed)


@pytest.mark.parametrize("seed", [2])
def test_engine_stress_async_steps(tiny_llama_dir: Path, reference_llm: LLM, monkeypatch: pytest.MonkeyPatch,
                                   seed: int) -> None:
    """The same with asynchronous steps (the CUDA default) forced on the CPU."""
    monkeypatch.setenv("PAGELLM_ASYNC_STEPS", "force")
    _stress(tiny_llama_dir, reference_llm, seed)


# ---- regressions -------------------------------------------------------------------------------
@pytest.mark.parametrize("end", ["abort", "stop"])
def test_reused_request_id_does_not_inherit_the_in_flight_token(tiny_llama_dir: Path, reference_llm: LLM,
                                                                 monkeypatch: pytest.MonkeyPatch, end: str) -> None:
    """With asynchronous steps the runner matches a request to its row of the step in flight by
    request id. An id freed (aborted, or finished by a stop token while the next step was already
    launched) and added again at once used to take the old request's unread token as its own
    pending one: min_tokens counted it, and penalties saw it."""
    monkeypatch.setenv("PAGELLM_ASYNC_STEPS", "force")
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64MiB", seed=0)
    engine = llm.llm_engine
    assert engine.async_steps
    prompt = {"prompt_token_ids": [300 + i for i in range(7)]}
    unstopped = reference_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                                       use_tqdm=False)[0].outputs[0].token_ids
    # min_tokens=1 masks the stop token at the first position only: a phantom pending token lets
    # it through and the request stops after one token.
    params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=1, stop_token_ids=[unstopped[0]],
                            ignore_eos=True)
    expected = reference_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert len(expected.token_ids) > 1 and expected.token_ids[0] != unstopped[0]

    engine.add_request("other", {"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    if end == "abort":
        engine.add_request("x", prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        for _ in range(3):
            engine.step()
        assert engine._in_flight is not None and "x" in engine._in_flight.request_ids
        engine.abort_request("x")
    else:
        # Stops at its second token, read while the step after it (scheduled in vain) is in flight.
        engine.add_request("x", prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                       stop_token_ids=[unstopped[1]]))
        while not any(o.request_id == "x" and o.finished for o in engine.step()):
            pass
        assert engine._in_flight is not None and "x" in engine._in_flight.request_ids
    engine.add_request("x", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "x" and out.finished:
                final = out.outputs[0]
    assert final is not None
    assert (final.token_ids, final.finish_reason) == (expected.token_ids, expected.finish_reason)
    _check_idle(engine)
