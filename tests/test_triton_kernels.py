"""Triton paged-attention and KV-cache-write kernels against the plain PyTorch reference ops.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the
kernels are decorated) at small shapes. With CUDA the same tests run compiled on the GPU, and the
`gpu`-marked tests add real model shapes, the automatic split-KV path and CUDA-graph capture.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated, so before the imports below
pytest.importorskip("triton")

from pagellm.kernels.reference import paged_attention_ref, write_kv_cache_ref  # noqa: E402
from pagellm.kernels.triton import kv_cache_write as kv_cache_write_module  # noqa: E402
from pagellm.kernels.triton import paged_attention as paged_attention_module  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _kernels_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(paged_attention_module._paged_attention_kernel, InterpretedFunction)


if DEVICE.type == "cpu" and not _kernels_interpreted():
    # Another module imported the kernels before TRITON_INTERPRET was set: decorate them again.
    paged_attention_module = importlib.reload(paged_attention_module)
    kv_cache_write_module = importlib.reload(kv_cache_write_module)

paged_attention = paged_attention_module.paged_attention
write_kv_cache = kv_cache_write_module.write_kv_cache
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

POISON_BLOCK = 0  # cache block full of NaN; unused block-table entries point at it


def make_step(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0,
              device: torch.device = DEVICE, spare_blocks: int = 2) -> dict:
    """A step over `seqs` = [(cached context length, query length)], with the K/V already in the cache.

    Every cache slot not holding a real key is NaN, and unused block-table entries point at an
    all-NaN block, so a kernel that reads past a sequence's keys poisons its output.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + q for ctx, q in seqs]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + spare_blocks
    num_blocks = 1 + sum(blocks_per_seq) + 3
    # Scatter sequences over the pool in a shuffled order, as a long-running engine would.
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_tables = torch.full((len(seqs), max_blocks), POISON_BLOCK, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    for s, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        block_tables[s, :nb] = torch.tensor([pool.pop() for _ in range(nb)], dtype=torch.int32)
        pos = torch.arange(n)
        slots = block_tables[s].long()[pos // block_size] * block_size + pos % block_size
        keys = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        write_kv_cache_ref(keys, values, k_cache, v_cache, slots)
    query_lens = [q for _, q in seqs]
    query_start_loc = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    num_tokens = sum(query_lens)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    return dict(query=query.to(device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
                block_tables=block_tables.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
                query_start_loc=query_start_loc.to(device), max_query_len=max(query_lens),
                max_seq_len=max(seq_lens))


def run_and_compare(step: dict, atol: float = 1e-4, rtol: float = 1e-4, scale: float | None = None,
                    **kwargs) -> torch.Tensor:
    """Runs the kernel into a NaN-poisoned output, checks every row was written and matches the oracle."""
    query = step["query"]
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    out = torch.full_like(query, float("nan"))
    result = paged_attention(query, step["k_cache"], step["v_cache"], step["block_tables"], step["seq_lens"],
                             step["query_start_loc"], step["max_query_len"], step["max_seq_len"], scale,
                             out=out, **kwargs)
    assert result is out
    assert not out.isnan().any(), "some output rows were not written (or NaN leaked from unused cache slots)"
    ref_kwargs = {k: v for k, v in kwargs.items() if k in ("sliding_window", "logits_soft_cap")}
    expected = paged_attention_ref(query, step["k_cache"], step["v_cache"], step["block_tables"], step["seq_lens"],
                                   step["query_start_loc"], scale, **ref_kwargs)
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)
    return out


# Fresh prefill crossing a block edge, decodes at the block-boundary lengths 15/16/17 (after this
# step's token), a prefill chunk over a cached prefix, and an odd-length decode.
MIXED = [(0, 17), (14, 1), (15, 1), (16, 1), (20, 13), (36, 1)]


# ---------------------------------------------------------------------------- reference sanity


def test_reference_matches_dense_causal_attention():
    # The oracle itself, for one fresh sequence: dense causal attention with GQA expanded by hand.
    step = make_step([(0, 19)], num_heads=4, num_kv_heads=2, head_dim=8, block_size=8, device=torch.device("cpu"))
    scale = 0.3
    out = paged_attention_ref(step["query"], step["k_cache"], step["v_cache"], step["block_tables"],
                              step["seq_lens"], step["query_start_loc"], scale)
    nb = -(-19 // 8)
    k = step["k_cache"][step["block_tables"][0, :nb].long()].reshape(-1, 2, 8)[:19]   # [L, Hkv, D]
    v = step["v_cache"][step["block_tables"][0, :nb].long()].reshape(-1, 2, 8)[:19]
    q = step["query"].transpose(0, 1)                                                    # [H, L, D]
    k = k.repeat_interleave(2, dim=1).transpose(0, 1)
    v = v.repeat_interleave(2, dim=1).transpose(0, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    torch.testing.assert_close(out, dense.transpose(0, 1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- KV-cache write


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [8, 16])
def test_write_kv_cache_matches_reference(dtype, block_size):
    gen = torch.Generator().manual_seed(1)
    num_tokens, num_kv_heads, head_dim, num_blocks = 11, 3, 40, 6
    # key/value as strided views of one fused projection output, as the model produces them.
    fused = torch.randn(num_tokens, 2 * num_kv_heads * head_dim + 8, generator=gen).to(dtype).to(DEVICE)
    key = fused[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = fused[:, num_kv_heads * head_dim: 2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1  # padding tokens
    slots = slots.to(DEVICE)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_expected, v_expected, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)
    # The written slots really changed (the oracle is not a no-op).
    flat = k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[slots[0]], key[0])


def test_write_kv_cache_short_slot_mapping_skips_trailing_tokens():
    key = torch.randn(5, 2, 16, device=DEVICE)
    value = torch.randn(5, 2, 16, device=DEVICE)
    k_cache = torch.zeros(2, 8, 2, 16, device=DEVICE)
    v_cache = torch.zeros(2, 8, 2, 16, device=DEVICE)
    write_kv_cache(key, value, k_cache, v_cache, torch.tensor([3, 9, -1], device=DEVICE))
    flat_k, flat_v = k_cache.view(16, 2, 16), v_cache.view(16, 2, 16)
    assert torch.equal(flat_k[3], key[0]) and torch.equal(flat_v[9], value[1])
    assert int((flat_k.abs().sum(dim=(1, 2)) > 0).sum()) == 2


def test_write_kv_cache_rejects_bad_input():
    key = torch.randn(4, 2, 16, device=DEVICE)
    cache = torch.zeros(2, 8, 2, 16, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        write_kv_cache(key.half(), key.half(), cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="key must be"):
        write_kv_cache(key[:, :1], key, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="block_size"):
        write_kv_cache(key, key, torch.zeros(2, 6, 2, 16, device=DEVICE), torch.zeros(2, 6, 2, 16, device=DEVICE),
                       slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, key, cache, cache.clone(), slots.float())


# ---------------------------------------------------------------------------- paged attention


@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 64), (8, 64), (4, 128)])
def test_mixed_batch(group, head_dim):
    num_kv_heads = 2 if group < 8 else 1
    step = make_step(MIXED, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    run_and_compare(step)


@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_block_sizes(block_size):
    step = make_step([(0, 9), (31, 1), (40, 3)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=block_size)
    run_and_compare(step)


@pytest.mark.parametrize("head_dim", [80, 256])
def test_head_dims_padded_and_large(head_dim):
    step = make_step([(0, 5), (16, 1), (7, 3)], num_heads=4, num_kv_heads=2, head_dim=head_dim)
    run_and_compare(step)


def test_group_not_power_of_two():
    # 6 query heads per KV head: tile rows hold whole tokens' head groups, the rest is masked.
    step = make_step([(0, 7), (15, 1), (9, 4)], num_heads=12, num_kv_heads=2, head_dim=64)
    run_and_compare(step)


@pytest.mark.parametrize("window", [1, 5, 20])
def test_sliding_window(window):
    step = make_step([(0, 23), (40, 1), (30, 9), (3, 1)], num_heads=4, num_kv_heads=1, head_dim=64)
    run_and_compare(step, sliding_window=window)


def test_logits_soft_cap():
    # A large scale makes raw scores reach ~+-30, so a cap of 5 changes the result a lot.
    step = make_step(MIXED[:4], num_heads=4, num_kv_heads=2, head_dim=64)
    out = run_and_compare(step, scale=4.0, logits_soft_cap=5.0)
    uncapped = paged_attention_ref(step["query"], step["k_cache"], step["v_cache"], step["block_tables"],
                                   step["seq_lens"], step["query_start_loc"], 4.0)
    assert (out - uncapped).abs().max() > 0.1


def test_window_and_soft_cap_together():
    step = make_step([(0, 18), (25, 1)], num_heads=8, num_kv_heads=2, head_dim=64)
    run_and_compare(step, sliding_window=7, logits_soft_cap=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    step = make_step(MIXED[:4], num_heads=8, num_kv_heads=2, head_dim=64, dtype=dtype)
    run_and_compare(step, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_splits", [2, 8])
def test_split_kv_decode(num_splits):
    # 8 splits over <= 4 key tiles leaves some splits empty: they must merge as zero weight.
    step = make_step([(47, 1), (3, 1), (16, 1)], num_heads=8, num_kv_heads=2, head_dim=64)
    run_and_compare(step, num_kv_splits=num_splits)


def longest_first(step: dict) -> torch.Tensor:
    return torch.argsort(step["seq_lens"].cpu(), descending=True, stable=True).to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_order_is_a_schedule_only(num_splits):
    # Programs taken longest sequence first (and a scrambled order) give the same rows; a sequence
    # with no query this step (q_len 0) is skipped.
    step = make_step([(3, 1), (47, 1), (16, 1), (30, 0), (31, 1)], num_heads=8, num_kv_heads=2, head_dim=64)
    run_and_compare(step, num_kv_splits=num_splits, seq_order=longest_first(step))
    scrambled = torch.tensor([2, 4, 0, 3, 1], dtype=torch.int32, device=DEVICE)
    run_and_compare(step, num_kv_splits=num_splits, seq_order=scrambled, sliding_window=20)


def test_decode_programs_map_straight_to_sequences_in_one_wave():
    # 2 sequences x 2 KV heads fit one (interpreter) wave: program p takes sequence p // 2, no order read.
    step = make_step([(20, 1), (5, 1)], num_heads=4, num_kv_heads=2, head_dim=64)
    run_and_compare(step, num_kv_splits=1, seq_order=longest_first(step))


def test_decode_order_ignored_for_prefill_steps():
    step = make_step([(0, 9), (12, 1), (5, 3)], num_heads=4, num_kv_heads=2, head_dim=64)
    run_and_compare(step, seq_order=longest_first(step))


def test_split_kv_mixed_batch_with_window():
    step = make_step([(0, 11), (40, 1), (20, 5)], num_heads=4, num_kv_heads=2, head_dim=64)
    run_and_compare(step, num_kv_splits=4, sliding_window=9)


def test_empty_query_sequence_and_single_token_prefill():
    # A sequence with no tokens this step (q_len 0) between others, and a 1-token fresh prompt.
    step = make_step([(0, 6), (10, 0), (0, 1), (17, 2)], num_heads=4, num_kv_heads=2, head_dim=64)
    run_and_compare(step)


def test_hints_only_pick_tiles():
    # Wrong host-side hints (decode-only max_query_len for a prefill step) must not change results,
    # so a captured graph or a lazy caller can pass loose bounds.
    step = make_step([(0, 21), (5, 1)], num_heads=8, num_kv_heads=1, head_dim=64)
    step["max_query_len"], step["max_seq_len"] = 1, 1
    run_and_compare(step)


def test_strided_query_and_output_views():
    step = make_step([(0, 9), (16, 1)], num_heads=4, num_kv_heads=2, head_dim=64)
    query = step["query"]
    num_tokens = query.shape[0]
    # The query as a slice of a fused qkv row, the output as a slice of a wider buffer.
    fused = torch.randn(num_tokens, 4 * 64 + 2 * 2 * 64, device=DEVICE)
    fused[:, : 4 * 64] = query.reshape(num_tokens, -1)
    query_view = fused[:, : 4 * 64].view(num_tokens, 4, 64)
    buffer = torch.full((num_tokens, 6, 64), float("nan"), device=DEVICE)
    out_view = buffer[:, 1:5]
    paged_attention(query_view, step["k_cache"], step["v_cache"], step["block_tables"], step["seq_lens"],
                    step["query_start_loc"], step["max_query_len"], step["max_seq_len"], 0.125, out=out_view)
    expected = paged_attention_ref(query, step["k_cache"], step["v_cache"], step["block_tables"],
                                   step["seq_lens"], step["query_start_loc"], 0.125)
    torch.testing.assert_close(out_view, expected, atol=1e-4, rtol=1e-4)
    assert buffer[:, 0].isnan().all() and buffer[:, 5].isnan().all()  # neighbours untouched


def test_write_then_attend_round_trip():
    # The engine's order: write this step's K/V with the kernel, then attend over the cache.
    step = make_step([(12, 4), (20, 1)], num_heads=4, num_kv_heads=2, head_dim=64)
    k_cache, v_cache = step["k_cache"], step["v_cache"]
    seq_lens = step["seq_lens"].tolist()
    # Poison this step's slots, then restore them through write_kv_cache.
    slots, keys, values = [], [], []
    for s, (n, q) in enumerate(zip(seq_lens, [4, 1])):
        for pos in range(n - q, n):
            block = int(step["block_tables"][s, pos // 16])
            slots.append(block * 16 + pos % 16)
    slots = torch.tensor(slots, device=DEVICE)
    flat_k, flat_v = k_cache.view(-1, 2, 64), v_cache.view(-1, 2, 64)
    keys, values = flat_k[slots].clone(), flat_v[slots].clone()
    flat_k[slots], flat_v[slots] = float("nan"), float("nan")
    write_kv_cache(keys, values, k_cache, v_cache, slots)
    run_and_compare(step)


# A mixed step as the model runner orders it: the decodes lead, then prefill chunks (one of them
# cached, one long enough for two row tiles in the interpreter).
DECODES_FIRST = [(14, 1), (15, 1), (16, 1), (36, 1), (0, 17), (20, 13), (9, 40)]


def test_first_seq_attends_only_the_later_sequences():
    # The prefill chunks of DECODES_FIRST alone: their rows match the oracle, the decodes' rows are
    # left as they were.
    step = make_step(DECODES_FIRST, num_heads=4, num_kv_heads=2, head_dim=64)
    query, d = step["query"], 4
    args = [step[k] for k in ("query", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc")]
    out = torch.full_like(query, float("nan"))
    paged_attention(*args, step["max_query_len"], step["max_seq_len"], 0.125, out=out, first_seq=d)
    expected = paged_attention_ref(*args, 0.125)
    assert out[:d].isnan().all()
    torch.testing.assert_close(out[d:], expected[d:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="first_seq"):
        paged_attention(*args, step["max_query_len"], step["max_seq_len"], 0.125, first_seq=len(DECODES_FIRST) + 1)


@pytest.mark.parametrize("window", [None, 6])
def test_backend_mixed_step_in_two_launches(monkeypatch, window):
    from pagellm.layers.attention import triton_backend
    from pagellm.layers.attention.backend import AttentionMetadata
    launches = []  # (sequences, first_seq) per launch; the kernels are this module's (interpreted on the CPU)
    monkeypatch.setattr(triton_backend, "paged_attention", lambda *a, **k: launches.append(
        (a[4].shape[0], k.get("first_seq", 0))) or paged_attention(*a, **k))
    step = make_step(DECODES_FIRST, num_heads=8, num_kv_heads=2, head_dim=64)
    lens = [q for _, q in DECODES_FIRST]
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device=DEVICE), query_start_loc=step["query_start_loc"],
        seq_lens=step["seq_lens"], block_tables=step["block_tables"], max_query_len=step["max_query_len"],
        max_seq_len=step["max_seq_len"], num_decodes=4, num_decode_tokens=4, query_lens_cpu=lens,
        seq_lens_cpu=step["seq_lens"].tolist())
    out = triton_backend.TritonAttentionBackend().forward(
        step["query"], None, None, step["k_cache"], step["v_cache"], meta, 0.125, sliding_window=window,
        kv_written=True)
    expected = paged_attention_ref(step["query"], step["k_cache"], step["v_cache"], step["block_tables"],
                                   step["seq_lens"], step["query_start_loc"], 0.125, sliding_window=window)
    assert launches == [(4, 0), (len(DECODES_FIRST), 4)]  # the decodes, then the chunks after them
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_rejects_bad_input():
    step = make_step([(0, 3)], num_heads=4, num_kv_heads=2, head_dim=64)
    args = [step[k] for k in ("query", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc")]
    with pytest.raises(ValueError, match="num_heads"):
        paged_attention(args[0][:, :3], *args[1:], 3, 3, 0.1)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(args[0].half(), *args[1:], 3, 3, 0.1)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(*args[:5], args[5][:1], 3, 3, 0.1)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention(*args, 3, 3, 0.1, sliding_window=0)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        paged_attention(*args, 3, 3, 0.1, logits_soft_cap=-1.0)
    with pytest.raises(ValueError, match="num_kv_splits"):
        paged_attention(*args, 3, 3, 0.1, num_kv_splits=3)
    with pytest.raises(ValueError, match="seq_order"):
        paged_attention(*args, 3, 3, 0.1, seq_order=torch.zeros(7, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        paged_attention(*args, 3, 3, 0.1, out=torch.empty(3, 4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="block_m"):
        paged_attention_module.AttentionKernelConfig(block_m=24, block_n=16)


def test_split_heuristic(monkeypatch):
    # Pretend to be a 132-SM GPU; the heuristic reads host ints only, so no CUDA is needed.
    monkeypatch.setattr(paged_attention_module, "num_sms", lambda device: 132)
    select = paged_attention_module.select_num_splits
    cuda = torch.device("cuda", 0)
    assert select(cuda, 1, 8, 1, 8192) == 32          # one long sequence: split up to the cap
    assert select(cuda, 4, 8, 1, 8192) == 16          # two waves of 132 programs
    assert select(cuda, 1, 8, 1, 700) == 2            # each split keeps >= 256 keys
    assert select(cuda, 64, 8, 1, 8192) == 1          # enough programs already
    assert select(cuda, 24, 8, 1, 8192) == 2          # 1-3 programs per SM: two splits even the last wave
    assert select(cuda, 24, 8, 1, 300) == 1           # ... unless a split would get < 256 keys
    assert select(cuda, 1, 8, 16, 8192) == 1          # prefill steps never split
    assert select(torch.device("cpu"), 1, 8, 1, 8192) == 1
    for batch in (1, 2, 3, 5, 16):
        splits = select(cuda, batch, 2, 1, 4096)
        assert splits & (splits - 1) == 0 and 1 <= splits <= 16


# ---------------------------------------------------------------------------- GPU, real shapes


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_mixed_batch_real_shapes(dtype):
    # Llama-3-8B attention shapes: 32 query heads over 8 KV heads, head_dim 128.
    gen = torch.Generator().manual_seed(3)
    decodes = [(int(n), 1) for n in torch.randint(1, 3000, (48,), generator=gen)]
    seqs = [(0, 700), (1500, 333)] + decodes + [(4095, 1), (16, 1)]
    step = make_step(seqs, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype)
    run_and_compare(step, atol=2e-2, rtol=2e-2)


@gpu
@requires_cuda
def test_gpu_split_kv_chosen_for_small_long_decode():
    seqs = [(8191, 1), (5000, 1), (100, 1)]
    step = make_step(seqs, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    splits = paged_attention_module.select_num_splits(DEVICE, 3, 8, 1, 8192)
    assert splits > 1
    run_and_compare(step, atol=2e-2, rtol=2e-2)                 # heuristic path (split)
    run_and_compare(step, atol=2e-2, rtol=2e-2, num_kv_splits=1)


@gpu
@requires_cuda
@pytest.mark.parametrize("head_dim,group,window,cap", [(256, 2, 4096, 50.0), (64, 1, None, None),
                                                       (96, 7, None, None), (128, 4, 1000, None)])
def test_gpu_other_models(head_dim, group, window, cap):
    # Gemma-2-like (256, soft cap, window), MHA at 64, padded 96 with 7 heads per KV head, Mistral-like window.
    seqs = [(0, 513), (3000, 1), (6000, 1), (2048, 64), (15, 1)]
    step = make_step(seqs, num_heads=group * 4, num_kv_heads=4, head_dim=head_dim, dtype=torch.bfloat16)
    run_and_compare(step, atol=2e-2, rtol=2e-2, sliding_window=window, logits_soft_cap=cap)
    decode_only = make_step(seqs[1:2] + seqs[4:], num_heads=group * 4, num_kv_heads=4, head_dim=head_dim,
                            dtype=torch.bfloat16)
    run_and_compare(decode_only, atol=2e-2, rtol=2e-2, sliding_window=window, logits_soft_cap=cap, num_kv_splits=8)


@gpu
@requires_cuda
@pytest.mark.parametrize("num_splits", [None, 2])
def test_gpu_decode_order_ragged_batch(num_splits):
    # gpu-thr-like ragged decode batch on Qwen3-0.6B heads, programs longest first.
    gen = torch.Generator().manual_seed(5)
    seqs = [(int(n), 1) for n in torch.randint(100, 2000, (150,), generator=gen)]
    step = make_step(seqs, num_heads=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    run_and_compare(step, atol=2e-2, rtol=2e-2, num_kv_splits=num_splits, seq_order=longest_first(step))


@gpu
@requires_cuda
def test_gpu_decode_cuda_graph_replay():
    # Capture a decode step with a fixed bound on seq_len, then replay with other lengths in place.
    num_seqs, max_model_len = 4, 4096
    step = make_step([(4000, 1)] * num_seqs, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    args = [step[k] for k in ("query", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc")]
    out = torch.empty_like(step["query"])

    def run():
        paged_attention(*args, 1, max_model_len, 0.088, out=out)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lens in ([4001, 17, 1, 2500], [300, 4001, 4001, 64]):
        step["seq_lens"].copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        expected = paged_attention_ref(*args[:6], 0.088)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
