"""Automatic prefix caching: chained block hashes, reuse of cached blocks, LRU eviction, forced
hash collisions, and outputs that do not change when the cache is on (batched, preempted)."""

from __future__ import annotations

import random

import pytest

from pagellm import LLM, SamplingParams
from pagellm.config import SchedulerConfig
from pagellm.core import block_hash
from pagellm.core.block_hash import block_hashes, hash_block_tokens
from pagellm.core.kv_cache import KVCacheManager
from pagellm.core.scheduler import Scheduler, SchedulerOutput
from pagellm.engine.request import Request, RequestStatus

VOCAB = 49152


def _request(tokens: list[int], rid: str = "r", max_tokens: int = 8, **params) -> Request:
    return Request(rid, None, list(tokens), SamplingParams(max_tokens=max_tokens, **params), {2}, max_model_len=4096)


def _admit(kv: KVCacheManager, r: Request) -> list[int]:
    """What the scheduler does for a new request: look up, allocate the rest, compute it all.
    Returns the blocks it reused."""
    computed = kv.find_computed_blocks(r)
    reused = list(computed or [])
    num_new = r.num_tokens - len(reused) * kv.block_size
    assert kv.allocate_slots(r, num_new, computed)
    r.num_computed_tokens += num_new
    kv.cache_full_blocks(r)
    return reused


@pytest.fixture
def constant_hash(monkeypatch):
    """Every block hashes to 0: every lookup is a collision that only the confirmation can catch."""
    monkeypatch.setattr(block_hash, "hash_block_tokens", lambda parent, tokens, extra=None: 0)


# ---- hashing ------------------------------------------------------------------------------------
def test_block_hashes_are_chained_over_full_blocks() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 2)
    assert len(a) == 2
    assert a == block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, 2), "the partial block does not count"
    assert a[1] == hash_block_tokens(a[0], [5, 6, 7, 8])
    # Same second block after a different first block: a different hash.
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4, 2)
    assert b[1] != a[1]
    # Extra keys (LoRA, cache salt) change every hash.
    assert block_hashes([1, 2, 3, 4], 4, 1, extra_keys=("salt",)) != a[:1]
    known = a[:1]
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, 2, known=known) is known and known == a
    with pytest.raises(ValueError, match="num_blocks"):
        block_hashes([1, 2, 3], 4, 1)


# ---- the KV cache manager on its own ------------------------------------------------------------
def test_cached_prefix_is_reused_and_not_reported_new() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = _request(list(range(100, 114)), "a")  # 3 full blocks + 2 tokens
    assert _admit(kv, a) == []
    a_blocks = list(a.block_ids)
    assert sorted(kv.take_new_blocks()) == sorted(a_blocks)
    kv.free(a)
    assert kv.num_used_blocks == 0 and kv.pool.num_cached_blocks == 3

    b = _request(list(range(100, 114)), "b")
    assert _admit(kv, b) == a_blocks[:3]
    assert b.num_cached_tokens == 12 and b.block_ids[:3] == a_blocks[:3]
    new = kv.take_new_blocks()
    assert len(new) == 1 and new[0] not in a_blocks[:3], "reused blocks hold KV: they must not be zeroed"

    c = _request(list(range(100, 108)) + [7, 7, 7, 7, 7], "c")  # shares the first two blocks only
    assert _admit(kv, c) == a_blocks[:2]
    assert [kv.pool.ref_counts[blk] for blk in a_blocks[:3]] == [2, 2, 1]
    assert (kv.stats.queries, kv.stats.hits) == (14 + 14 + 13, 12 + 8)
    kv.free(b)
    kv.free(c)
    assert kv.num_used_blocks == 0 and all(n == 0 for n in kv.pool.ref_counts)


def test_block_with_the_last_prompt_token_is_never_reused() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = _request(list(range(12)), "first")  # exactly 3 full blocks
    _admit(kv, first)
    kv.free(first)
    assert kv.pool.num_cached_blocks == 3
    again = _request(list(range(12)), "again")
    computed = kv.find_computed_blocks(again)
    # The third block holds the last token, whose logits the request needs: it is computed.
    assert len(computed) == 2
    assert kv.allocate_slots(again, 4, computed)
    assert again.num_computed_tokens == 8 and len(again.block_ids) == 3


def test_lookup_needs_prefix_caching_or_a_fork_source() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = _request(list(range(12)), "a")
    _admit(kv, a)
    kv.free(a)
    assert kv.pool.num_cached_blocks == 0
    assert kv.find_computed_blocks(_request(list(range(12)), "b")) is None
    assert kv.stats.queries == 0


def test_prompt_logprobs_requests_compute_their_whole_prompt() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    _admit(kv, a := _request(list(range(12)), "a"))
    kv.free(a)
    assert kv.find_computed_blocks(_request(list(range(12)), "b", prompt_logprobs=1)) is None
    assert len(kv.find_computed_blocks(_request(list(range(12)), "c"))) == 2


def test_eviction_is_lru_and_never_touches_blocks_in_use() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    old, recent = _request([1] * 8 + [9], "old"), _request([2] * 8 + [9], "recent")
    _admit(kv, old)
    _admit(kv, recent)
    kv.free(old)  # freed first: least recently used
    kv.free(recent)
    assert kv.pool.num_cached_blocks == 4 and kv.num_free_blocks == 8
    # Someone holds "recent"'s prefix again.
    holder = _request([2] * 8 + [5, 5], "holder")
    assert len(_admit(kv, holder)) == 2
    held = set(holder.block_ids[:2])
    # Free now: 3 blocks holding nothing (one was "old"'s partial block) and 2 cached from "old".
    free_plain = kv.num_free_blocks - 2
    grab = _request(list(range(1000, 1000 + 4 * (free_plain + 1))), "grab")
    assert kv.allocate_slots(grab, grab.num_tokens)
    # Blocks holding nothing went first, then the tail of "old" (its second block).
    assert len(kv.find_computed_blocks(_request([1] * 8 + [9], "probe"))) == 1
    assert kv.allocate_slots(grab, grab.num_tokens + 4)
    assert kv.find_computed_blocks(_request([1] * 8 + [9], "probe")) == []
    assert kv.pool.num_evictions == 2
    # The pool is now exhausted: blocks in use are refused, not evicted.
    assert kv.num_free_blocks == 0
    assert not kv.allocate_slots(grab, grab.num_tokens + 8)
    assert held <= set(holder.block_ids) and not held & set(grab.block_ids)
    assert len(kv.find_computed_blocks(_request([2] * 8 + [9], "probe"))) == 2
    kv.free(holder)
    kv.free(grab)
    assert kv.num_used_blocks == 0


def test_forced_collision_is_confirmed_and_missed(constant_hash) -> None:
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_prefix_caching=True)
    x, y, z, w = [11] * 4, [12] * 4, [13] * 4, [14] * 4
    for rid, tokens in (("xy", x + y + [1]), ("w", w + [1])):
        r = _request(tokens, rid)
        _admit(kv, r)
        kv.free(r)
    assert kv.pool.num_cached_blocks == 3  # x, y (after x) and w, all under hash 0
    assert kv.find_computed_blocks(_request(z + y + [1])) == [], "other tokens under the same hash"
    assert len(kv.find_computed_blocks(_request(x + y + [1]))) == 2, "the real match is still found"
    # "y" matches a cached block's tokens, but that block was computed after "x", not after "w".
    assert len(kv.find_computed_blocks(_request(w + y + [1]))) == 1
    # Equal tokens at a different depth: the first block of "xy" is not a second block.
    assert len(kv.find_computed_blocks(_request(w + x + [1]))) == 1


def test_reset_prefix_cache_keeps_blocks_in_use() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    _admit(kv, a := _request(list(range(9)), "a"))
    _admit(kv, b := _request(list(range(50, 59)), "b"))
    kv.free(a)
    assert not kv.reset_prefix_cache(), "b's blocks are in use and stay cached"
    assert kv.find_computed_blocks(_request(list(range(9)))) == []
    assert len(kv.find_computed_blocks(_request(list(range(50, 59))))) == 2
    kv.free(b)
    assert kv.reset_prefix_cache() and kv.pool.num_cached_blocks == 0
    assert kv.num_free_blocks == 16


# ---- the scheduler with a fake KV store: no request ever reads KV that is not its own -------------
class FakeKV:
    """Stands in for the KV tensor: each slot records a fingerprint of the tokens that produced it."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.slots: dict[int, int] = {}

    @staticmethod
    def fingerprints(tokens: list[int]) -> list[int]:
        out, fp = [], 0
        for t in tokens:
            fp = hash((fp, t))
            out.append(fp)
        return out

    def run(self, out: SchedulerOutput) -> None:
        bs = self.kv.block_size
        for block in self.kv.take_new_blocks():
            for i in range(bs):
                self.slots.pop(block * bs + i, None)
        for item in out.scheduled:
            r = item.request
            fps = self.fingerprints(r.all_token_ids)
            slot = [r.block_ids[p // bs] * bs + p % bs for p in range(r.num_computed_tokens + item.num_new_tokens)]
            for p in range(r.num_computed_tokens):
                assert self.slots.get(slot[p]) == fps[p], f"{r.request_id} reads wrong KV at position {p}"
            for p in range(r.num_computed_tokens, r.num_computed_tokens + item.num_new_tokens):
                self.slots[slot[p]] = fps[p]


def _simulate(num_blocks: int, seed: int) -> tuple[KVCacheManager, int]:
    """A random workload with shared prefixes, forks (n > 1) and a pool small enough to preempt
    and evict. Returns the KV manager and the number of preemptions."""
    rng = random.Random(seed)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24, max_model_len=4096)
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=True)
    sched = Scheduler(config, kv)
    fake = FakeKV(kv)
    systems = [[rng.randrange(3, 6) for _ in range(rng.randint(4, 14))] for _ in range(3)]
    requests = []
    for i in range(24):
        prompt = rng.choice(systems) + [rng.randrange(3, 6) for _ in range(rng.randint(0, 9))]
        children = [_request(prompt, f"{i}#{j}", max_tokens=rng.randint(1, 10)) for j in range(rng.choice((1, 1, 3)))]
        for child in children[1:]:
            child.fork_source = children[0]
        requests += children
    pending = list(requests)
    preemptions = 0
    for _ in range(5000):
        while pending and rng.random() < 0.5:
            sched.add_request(pending.pop(0))
        if not sched.num_unfinished and not pending:
            break
        out = sched.schedule()
        preemptions += len(out.preempted)
        held = [b for r in sched.running for b in r.block_ids]
        assert all(kv.pool.ref_counts[b] == held.count(b) for b in set(held))
        fake.run(out)
        for item in out.scheduled:
            r = item.request
            samples = item.samples
            r.num_computed_tokens += item.num_new_tokens
            if samples:
                # A small alphabet, so that generated blocks are shared too.
                r.output_token_ids.append(rng.randrange(3, 6))
                if len(r.output_token_ids) >= r.max_tokens:
                    sched.finish(r, RequestStatus.FINISHED_LENGTH)
    else:
        pytest.fail("did not finish")
    assert all(r.is_finished and len(r.output_token_ids) == r.max_tokens for r in requests)
    assert kv.num_used_blocks == 0 and all(n == 0 for n in kv.pool.ref_counts)
    return kv, preemptions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_serves_only_correct_kv_and_leaks_nothing(seed: int) -> None:
    kv, preemptions = _simulate(num_blocks=14, seed=seed)
    assert preemptions > 0, "the pool was meant to run dry"
    assert kv.stats.hits > 0 and kv.pool.num_evictions > 0


def test_random_workload_with_every_hash_colliding(constant_hash) -> None:
    kv, _ = _simulate(num_blocks=14, seed=3)
    assert kv.stats.hits > 0


# ---- through the engine -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uncached_llm(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64MiB", seed=0, enable_prefix_caching=False)


def _shared_prefix_prompts(seed: int, count: int = 8) -> list[dict]:
    """Prompts sharing a 37-token system prefix, with tails of various lengths, some repeated,
    and one that is a prefix of another."""
    rng = random.Random(seed)
    system = [rng.randrange(3, VOCAB) for _ in range(37)]
    prompts = [system + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(count - 2)]
    prompts += [list(prompts[0]), prompts[1][:len(system) + 1]]
    return [{"prompt_token_ids": p} for p in prompts]


def _params(count: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=6 + 3 * (i % 4), ignore_eos=True, logprobs=2)
            for i in range(count)]


def _assert_same(ours, ref) -> None:
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for token in pa.keys() & pb.keys():
                assert pa[token].logprob == pytest.approx(pb[token].logprob, abs=1e-4)


def test_outputs_equal_with_and_without_caching(tiny_llm, uncached_llm) -> None:
    prompts, params = _shared_prefix_prompts(seed=10), _params(8)
    reference = uncached_llm.generate(prompts, params, use_tqdm=False)
    engine = tiny_llm.llm_engine
    hits_before = engine.stats().prefix_cache_hits
    # All at once (nothing cached yet), then one by one, then in reverse order.
    _assert_same(tiny_llm.generate(prompts, params, use_tqdm=False), reference)
    one_by_one = [tiny_llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    _assert_same(one_by_one, reference)
    _assert_same(tiny_llm.generate(prompts[::-1], params[::-1], use_tqdm=False)[::-1], reference)
    assert engine.stats().prefix_cache_hits > hits_before
    assert engine.kv_cache.num_used_blocks == 0
    assert uncached_llm.llm_engine.stats().prefix_cache_queries == 0


def test_outputs_equal_under_preemption_and_eviction(tiny_llama_dir, uncached_llm) -> None:
    # 12 blocks of 8 tokens for prompts of 38-67 tokens that grow by up to 15: the pool runs dry.
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=8, num_gpu_blocks_override=12,
              max_num_batched_tokens=24, seed=0)
    prompts, params = _shared_prefix_prompts(seed=11), _params(8)
    reference = uncached_llm.generate(prompts, params, use_tqdm=False)
    engine = llm.llm_engine
    _assert_same(llm.generate(prompts, params, use_tqdm=False), reference)
    _assert_same(llm.generate(prompts, params, use_tqdm=False), reference)
    stats = engine.stats()
    assert stats.num_preemptions > 0, "the pool was meant to run dry"
    assert stats.prefix_cache_hits > 0 and engine.kv_cache.pool.num_evictions > 0
    assert engine.kv_cache.num_used_blocks == 0 and all(n == 0 for n in engine.kv_cache.pool.ref_counts)


def test_repeated_prompt_hit_rate(tiny_llm) -> None:
    rng = random.Random(12)
    prompt = {"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(161)]}
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine = tiny_llm.llm_engine
    first = tiny_llm.generate(prompt, params, use_tqdm=False)[0]
    before = engine.stats()
    repeats = tiny_llm.generate([prompt] * 10, params, use_tqdm=False)
    after = engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    assert queries == 10 * 161
    assert hits / queries > 0.9
    assert after.prompt_tokens - before.prompt_tokens == 10 * 1, "only the last prompt token is computed"
    assert all(r.outputs[0].token_ids == first.outputs[0].token_ids for r in repeats)


def test_burst_sharing_a_new_prefix_computes_it_once(tiny_llm, uncached_llm) -> None:
    # Six requests arrive together with a 64-token prefix nobody has computed: the first computes
    # it, the others wait one step and find it cached (before, each of them in the first step's
    # budget computed it again).
    rng = random.Random(14)
    system = [rng.randrange(3, VOCAB) for _ in range(64)]
    prompts = [{"prompt_token_ids": system + [rng.randrange(3, VOCAB) for _ in range(5 + i)]} for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)] * 6
    engine = tiny_llm.llm_engine
    before = engine.stats()
    _assert_same(tiny_llm.generate(prompts, params, use_tqdm=False),
                 uncached_llm.generate(prompts, params, use_tqdm=False))
    after = engine.stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits == 5 * 64
    computed = after.prompt_tokens - before.prompt_tokens
    assert computed == 64 + sum(5 + i for i in range(6)), computed
    assert engine.kv_cache.num_used_blocks == 0


def test_reset_prefix_cache(tiny_llm) -> None:
    rng = random.Random(13)
    prompt = {"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(40)]}
    params = SamplingParams(temperature=0.0, max_tokens=2)
    engine = tiny_llm.llm_engine
    tiny_llm.generate(prompt, params, use_tqdm=False)
    assert tiny_llm.reset_prefix_cache() is True
    before = engine.stats().prefix_cache_hits
    tiny_llm.generate(prompt, params, use_tqdm=False)
    assert engine.stats().prefix_cache_hits == before
    tiny_llm.generate(prompt, params, use_tqdm=False)
    assert engine.stats().prefix_cache_hits == before + 32


def test_forced_collision_does_not_change_outputs(tiny_llm, uncached_llm, constant_hash) -> None:
    prompts, params = _shared_prefix_prompts(seed=14), _params(8)
    reference = uncached_llm.generate(prompts, params, use_tqdm=False)
    tiny_llm.generate(prompts[:3], params[:3], use_tqdm=False)  # fills the cache, all under hash 0
    before = tiny_llm.llm_engine.stats().prefix_cache_hits
    _assert_same(tiny_llm.generate(prompts, params, use_tqdm=False), reference)
    assert tiny_llm.llm_engine.stats().prefix_cache_hits > before


def test_prompt_logprobs_unchanged_by_caching(tiny_llm, uncached_llm) -> None:
    prompts = _shared_prefix_prompts(seed=15, count=4)
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2)
    tiny_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)  # cache them
    ours = tiny_llm.generate(prompts, params, use_tqdm=False)
    ref = uncached_llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(ours, ref):
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(a.prompt_token_ids)
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert pa.keys() == pb.keys()
            for token in pa:
                assert pa[token].logprob == pytest.approx(pb[token].logprob, abs=1e-4)


def test_enable_prefix_caching_is_validated() -> None:
    from pagellm.engine.args import EngineArgs

    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineArgs(enable_prefix_caching="yes")  # type: ignore[arg-type]
