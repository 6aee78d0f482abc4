"""Triton paged attention: one kernel for mixed prefill/decode steps, with a split-KV mode.

Layout (fixed by the engine):
- k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; the keys of position p of
  sequence s live in block block_tables[s, p // block_size] at offset p % block_size.
- query [T, num_heads, head_dim], grouped per sequence; query_start_loc [S + 1] (cumulative query
  lengths); seq_lens [S] (context length including this step's tokens, whose K/V the engine has
  already written to the cache).

How the work is cut:
- A program owns one KV head and one tile of up to BLOCK_Q query tokens of one sequence. Its tile
  rows are the BLOCK_Q tokens x the G query heads that share the KV head (GQA), so every K/V tile
  is read once for all G heads and the M dimension of the matmuls stays >= 16 even in decode.
- Programs map to (sequence, query tile) without a host sync: sequence s owns the tile indices
  starting at query_start_loc[s] // BLOCK_Q + s, an upper bound on the tiles before it; a binary
  search over that array finds a program's sequence, and programs past their sequence's last
  tile exit at once. The grid, T // BLOCK_Q + S, depends only on shapes.
- Split-KV (flash decoding): with few (sequence, KV head) pairs and long contexts, a third grid
  axis cuts each sequence's key range into NUM_SPLITS chunks; each writes a partial output and
  its log-sum-exp, and a second kernel merges them. The split count comes from host ints only, so
  a captured CUDA graph replays with the same grid.
- Decode steps (the caller passes `seq_order`, vouching for one query per sequence): programs map
  straight to (sequence, KV head) pairs, all KV heads of a sequence together, with no search. When
  they take more than one wave of SMs, sequences go in `seq_order`'s order, longest first: programs
  are dispatched roughly in grid order, so the long ones start first and the last wave holds the
  short ones, and with ragged contexts the step no longer waits on a few long sequences started last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagellm.kernels.triton.device_info import num_sms
from pagellm.kernels.triton.launch_config import check_tiles
from pagellm.kernels.triton.pdl import pdl_options, release_dependents, wait_for_inputs

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_HEAD_DIM = 256
_MAX_SPLITS = 32
# A split below this many keys costs more in the merge than it wins in parallelism.
_MIN_KEYS_PER_SPLIT = 256
_CPU_WAVE = 8


@dataclass(frozen=True)
class AttentionKernelConfig:
    """Tile sizes and launch options of the attention kernel.

    block_m: rows of a program's tile (query tokens x query heads per KV head); power of two >= 16.
    block_n: keys per inner-loop step; power of two >= 16.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        check_tiles(self, ("block_m", "block_n"))


@triton.jit
def _find_sequence(query_start_loc_ptr, first_seq, num_seqs, tile, BLOCK_Q: tl.constexpr):
    # Largest s in [first_seq, num_seqs) with query_start_loc[s] // BLOCK_Q + s <= tile (the array is
    # increasing). Built from a tensor, not from the ints alone: Triton turns an int argument equal
    # to 1 into a constant, and a loop-carried value must keep one type.
    lo = tile * 0 + first_seq
    hi = tile * 0 + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        go_right = first_tile <= tile
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    return lo - 1


@triton.jit
def _tile_pages(block_table_row, start, kv_end, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    # [N] cache block of each key in [start, start + BLOCK_N): a per-key lookup works for any
    # block_size, and table entries past kv_end are never read.
    offs_n = start + tl.arange(0, BLOCK_N)
    return tl.load(block_table_row + offs_n // PAGE_SIZE, mask=offs_n < kv_end, other=0).to(tl.int64)


@triton.jit
def _attend_tile(q, k_cache_ptr, v_cache_ptr, pages, start, kv_end, kv_head, q_pos, offs_d, d_valid,
                 m_i, l_i, acc, scale, soft_cap, sliding_window,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr,
                 USE_SOFT_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    # One online-softmax step over the keys [start, start + BLOCK_N) ∩ [.., kv_end), pages from _tile_pages.
    offs_n = start + tl.arange(0, BLOCK_N)                                       # [N] key positions
    n_valid = offs_n < kv_end
    in_page = offs_n % PAGE_SIZE
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(k_cache_ptr + pages[:, None] * stride_kb + in_page[:, None] * stride_ks
                + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)       # [N, Dp]
    v = tl.load(v_cache_ptr + pages[:, None] * stride_vb + in_page[:, None] * stride_vs
                + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)       # [N, Dp]
    p_dtype = v_cache_ptr.dtype.element_ty  # P is rounded to the cache dtype for P @ V, as on the GPU
    if DOT_IN_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale                 # [M, N]
    if USE_SOFT_CAP:
        # cap * tanh(s / cap), with tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf.
        s = soft_cap * (1.0 - 2.0 / (tl.exp2(s * (2.0 * 1.4426950408889634 / soft_cap)) + 1.0))
    s = s * 1.4426950408889634  # log2(e): exp2 is the native instruction
    visible = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        visible = visible & (offs_n[None, :] > q_pos[:, None] - sliding_window)
    s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, axis=1))                                       # [M]
    alpha = tl.exp2(m_i - m_new)                                                     # [M]
    p = tl.exp2(s - m_new[:, None])                                                  # [M, N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(p_dtype).to(v.dtype), v, acc, input_precision=DOT_PRECISION)      # [M, Dp]
    return m_new, l_i, acc


# Step-varying ints are not specialized: Triton would otherwise compile a new variant the first
# time a step has, say, a multiple of 16 sequences or a block table 16 blocks wide (half a second
# to seconds in the middle of a run).
@triton.jit(do_not_specialize=["num_seqs", "first_seq", "stride_bt"])
def _paged_attention_kernel(
    out_ptr, partial_out_ptr, partial_lse_ptr,
    query_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, seq_order_ptr,
    num_seqs, first_seq, num_heads, num_kv_heads, scale, soft_cap, sliding_window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr,             # query heads per KV head
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,         # cache block size
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DECODE: tl.constexpr,            # 0: any step; one query per sequence: 1 program p -> sequence
                                     # p // num_kv_heads, 2 the same in seq_order (see module doc)
    USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,       # Triton's CPU interpreter multiplies bf16 dot operands wrongly
    USE_PDL: tl.constexpr,           # programmatic dependent launch (kernels/triton/pdl.py)
):
    # The step's metadata (sequence bounds, block tables) is written before the step's first layer,
    # never by the kernel just before this one: it loads before the PDL wait, while that kernel
    # finishes. The query and this step's K/V come from that kernel, so they load after the wait.
    split = tl.program_id(2)
    if DECODE > 0:
        pid = tl.program_id(0)                # [sequence (rank in seq_order)][KV head]
        kv_head = pid % num_kv_heads
        seq = pid // num_kv_heads
        if DECODE == 2:
            seq = tl.load(seq_order_ptr + seq)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        q_tile = 0
    else:
        # Tiles count from sequence first_seq's: the sequences before it are another launch's.
        tile = tl.program_id(0) + tl.load(query_start_loc_ptr + first_seq) // BLOCK_Q + first_seq
        kv_head = tl.program_id(1)
        seq = _find_sequence(query_start_loc_ptr, first_seq, num_seqs, tile, BLOCK_Q)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        q_tile = tile - (q_start // BLOCK_Q + seq)  # this program's query tile within the sequence
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # keys cached before this step's tokens

    # Keys this tile can see: up to its last query's position; with a window, from the first
    # query's window start (rounded down to a tile so loads start on block_n boundaries).
    last_q = tl.minimum((q_tile + 1) * BLOCK_Q, q_len) - 1
    kv_end = context_len + last_q + 1
    kv_start = context_len * 0
    if USE_WINDOW:
        kv_start = tl.maximum(context_len + q_tile * BLOCK_Q - sliding_window + 1, 0)
        kv_start = (kv_start // BLOCK_N) * BLOCK_N
    if NUM_SPLITS > 1:
        num_kv_tiles = tl.cdiv(kv_end - kv_start, BLOCK_N)
        tiles_per_split = tl.cdiv(num_kv_tiles, NUM_SPLITS)
        kv_start = kv_start + split * tiles_per_split * BLOCK_N
        kv_end = tl.minimum(kv_end, kv_start + tiles_per_split * BLOCK_N)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # The first tile's pages too: a decode split is often a single tile.
    first_pages = _tile_pages(block_table_row, kv_start, kv_end, BLOCK_N, PAGE_SIZE)
    wait_for_inputs(USE_PDL)
    if q_tile * BLOCK_Q >= q_len:
        return

    # Row m of the tile is query token q_idx (within the sequence) read by query head `head`.
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + offs_m // GROUP                          # [M]
    head = kv_head * GROUP + offs_m % GROUP                             # [M]
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)            # [M]
    q_pos = context_len + q_idx                                          # [M]
    token = (q_start + q_idx).to(tl.int64)                               # [M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM

    q = tl.load(query_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [M, Dp]
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # Online softmax in base 2, fp32. A finite floor for the running max keeps rows that have seen
    # no key yet free of inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # The first tile outside the loop, on the pages loaded before the wait. An empty range (an
    # empty split) leaves the state as it was: every key is masked.
    m_i, l_i, acc = _attend_tile(
        q, k_cache_ptr, v_cache_ptr, first_pages, kv_start, kv_end, kv_head, q_pos, offs_d, d_valid,
        m_i, l_i, acc, scale, soft_cap, sliding_window, stride_kb, stride_ks, stride_kh, stride_vb,
        stride_vs, stride_vh, BLOCK_N, PAGE_SIZE, USE_WINDOW, USE_SOFT_CAP, DOT_PRECISION, DOT_IN_FP32)
    for start in range(kv_start + BLOCK_N, kv_end, BLOCK_N):
        pages = _tile_pages(block_table_row, start, kv_end, BLOCK_N, PAGE_SIZE)
        m_i, l_i, acc = _attend_tile(
            q, k_cache_ptr, v_cache_ptr, pages, start, kv_end, kv_head, q_pos, offs_d, d_valid,
            m_i, l_i, acc, scale, soft_cap, sliding_window, stride_kb, stride_ks, stride_kh, stride_vb,
            stride_vs, stride_vh, BLOCK_N, PAGE_SIZE, USE_WINDOW, USE_SOFT_CAP, DOT_PRECISION, DOT_IN_FP32)

    release_dependents(USE_PDL)
    # A row that saw no key (empty sequence, or an empty split) has l_i == 0: output zeros.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]                                # [M, Dp]
    store_mask = row_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Partials are [T, H, NUM_SPLITS, HEAD_DIM] fp32, log-sum-exps (base 2) [T, H, NUM_SPLITS].
        row = (token * num_heads + head) * NUM_SPLITS + split                        # [M]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(partial_lse_ptr + row, lse, mask=row_valid)
        tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=store_mask)


@triton.jit
def _merge_splits_kernel(
    out_ptr, partial_out_ptr, partial_lse_ptr,
    num_heads, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    # One program per (token, head): a weighted sum of the split partials by their softmax mass.
    wait_for_inputs(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = token * num_heads + head
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    lse = tl.load(partial_lse_ptr + row * NUM_SPLITS + offs_s)                        # [S]
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)                                                  # [S], 0 if empty
    partial = tl.load(partial_out_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=d_valid[None, :], other=0.0)                              # [S, Dp]
    release_dependents(USE_PDL)
    # Empty splits' partials may be unwritten memory; never let them reach the sum.
    partial = tl.where(weight[:, None] > 0.0, partial, 0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * partial, axis=0) / tl.where(total > 0.0, total, 1.0)   # [Dp]
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_valid)


def select_config(device: torch.device, head_dim: int, group: int, max_query_len: int) -> AttentionKernelConfig:
    """Tile sizes for a step: small row tiles for decode-only steps, large ones once prefill is in."""
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    min_m = max(16, triton.next_power_of_2(group))  # a tile holds at least one token's G heads
    if device.type != "cuda":
        # The CPU interpreter: small tiles, so tests at small shapes still cross tile edges.
        return AttentionKernelConfig(block_m=max(min_m, 16 if max_query_len <= 1 else 32), block_n=16,
                                     num_warps=4, num_stages=1)
    if max_query_len <= 1:
        # Decode is bound by reading K/V. On an H200 (Llama-3-8B shapes, bf16) 64 keys x 2 stages read
        # ~4.2 TB/s at batch 64-256; 3 stages dropped to ~3.1 TB/s (fewer resident programs).
        block_n = 64 if head_dim_pad <= 128 else 32
        return AttentionKernelConfig(block_m=min_m, block_n=block_n, num_warps=4, num_stages=2)
    if head_dim_pad <= 128:
        # gpu-thr's 16k-token prefill chunks on an H200 (Qwen3-0.6B heads, bf16): 128 x 32 keys on 4
        # warps, 179 TFLOP/s of causal work, beat 128 x 64 on 8 warps (152) and 64 x 64 (174).
        return AttentionKernelConfig(block_m=max(min_m, 128), block_n=32, num_warps=4, num_stages=2)
    return AttentionKernelConfig(block_m=max(min_m, 64), block_n=32, num_warps=4, num_stages=2)


def select_num_splits(device: torch.device, num_seqs: int, num_kv_heads: int, max_query_len: int,
                      max_seq_len: int) -> int:
    """Split count for flash decoding: > 1 only for decode steps that would leave the GPU idle.

    Depends only on host ints, so a CUDA graph captured for a batch size (with max_seq_len set to
    the model's length bound) keeps its grid on replay.
    """
    if device.type != "cuda" or max_query_len > 1:
        return 1
    programs = num_seqs * num_kv_heads
    sms = num_sms(device)
    if programs >= 3 * sms:
        return 1
    if programs >= sms:
        # One to three programs per SM leave the last wave ragged: two splits evened it out on an
        # H200 (Qwen3-0.6B shapes, batch 24-32: 14-23% faster; batch 48 and up: one split is best).
        wanted = 2
    else:
        # Aim for two waves of programs.
        wanted = triton.next_power_of_2(math.ceil(2 * sms / max(programs, 1)))
    # Every split gets at least _MIN_KEYS_PER_SPLIT keys.
    useful = max(1, max_seq_len // _MIN_KEYS_PER_SPLIT)
    return min(wanted, _MAX_SPLITS, 1 << (useful.bit_length() - 1))


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    max_query_len: int, max_seq_len: int, scale: float,
                    sliding_window: int | None = None, logits_soft_cap: float | None = None,
                    out: torch.Tensor | None = None, *, num_kv_splits: int | None = None,
                    config: AttentionKernelConfig | None = None,
                    seq_order: torch.Tensor | None = None, first_seq: int = 0) -> torch.Tensor:
    """Causal attention of a flattened step's queries over the paged KV cache.

    Args:
        query: [T, num_heads, head_dim] fp16/bf16/fp32, contiguous last dim (views are fine).
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], query's dtype; block_size
            a power of two. This step's keys/values must already be written (see write_kv_cache).
        block_tables: [S, max_blocks_per_seq] int32; entries past a sequence's length are never read.
        seq_lens: [S] int32, context length of each sequence including this step's tokens.
        query_start_loc: [S + 1] int32, cumulative query lengths (query_start_loc[0] == 0).
        max_query_len, max_seq_len: host-side bounds on the query lengths and seq_lens. They pick
            tile sizes and the split count only; results do not depend on them being tight.
        scale: softmax scale applied to q.k.
        sliding_window: if set, a query at position p sees keys at positions > p - sliding_window.
        logits_soft_cap: if set, scores become cap * tanh(scores / cap) before the softmax.
        out: optional [T, num_heads, head_dim] output in query's dtype (contiguous last dim).
        num_kv_splits: force the split-KV count (power of two); None picks one (1 except for decode
            steps with few sequences on a GPU).
        config: force tile sizes; None picks them from the shapes.
        seq_order: optional [S] int32 permutation of the sequences, only for steps where every
            sequence has at most one query token (the caller vouches for it; max_query_len is
            otherwise only a hint): the order programs take them in, longest first being the
            useful one (see the module doc). Results do not depend on it; ignored when
            max_query_len > 1 or first_seq > 0.
        first_seq: attend only the sequences from this one on; the query rows of those before it
            are left untouched (another launch's: the tensors stay whole, so their addresses, and
            Triton's alignment specializations, do not change with the split point).

    Returns:
        `out` (or a new tensor), [T, num_heads, head_dim]. Rows of tokens past query_start_loc[S]
        are unspecified; a query that sees no key (seq_len 0) gets zeros.

    Raises:
        ValueError: on inconsistent shapes, dtypes, devices or layouts, or options out of range.
    No host-device sync: tensor values are not inspected.
    """
    _validate(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
              max_seq_len, sliding_window, logits_soft_cap, out, num_kv_splits, seq_order, first_seq)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == first_seq:
        return out

    group = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    if config is None:
        config = select_config(query.device, head_dim, group, max_query_len)
    if config.block_m < group:
        raise ValueError(f"config.block_m must be >= num_heads // num_kv_heads = {group}; got {config.block_m}")
    if num_kv_splits is None:
        num_kv_splits = select_num_splits(query.device, num_seqs, num_kv_heads, max_query_len, max_seq_len)
    block_q = config.block_m // group
    # With seq_order the caller vouches for one query per sequence: programs map straight to
    # sequences, in that order when they take more than one wave of the GPU's SMs (in the CPU
    # interpreter, more than _CPU_WAVE programs, so small tests cover both mappings).
    decode = 0
    if seq_order is not None and max_query_len <= 1 and first_seq == 0:
        wave = num_sms(query.device) if query.device.type == "cuda" else _CPU_WAVE
        decode = 2 if num_seqs * num_kv_heads * num_kv_splits > wave else 1
    if decode:
        grid = (num_seqs * num_kv_heads, 1, num_kv_splits)
    else:
        # Sequence s owns tiles from query_start_loc[s] // block_q + s on; this bounds the total.
        grid = (num_tokens // block_q + num_seqs - first_seq, num_kv_heads, num_kv_splits)

    if num_kv_splits > 1:
        partial_out = torch.empty(num_tokens, num_heads, num_kv_splits, head_dim, dtype=torch.float32,
                                  device=query.device)
        # Every token row a sequence owns is written by each split (an empty split writes -inf);
        # rows past query_start_loc[S] stay unspecified, as the docstring says.
        partial_lse = torch.empty(num_tokens, num_heads, num_kv_splits, dtype=torch.float32, device=query.device)
    else:
        partial_out = partial_lse = out  # unused by the kernel in this mode

    _paged_attention_kernel[grid](
        out, partial_out, partial_lse,
        query, k_cache, v_cache,
        block_tables, seq_lens, query_start_loc, seq_order if decode else seq_lens,
        num_seqs, first_seq, num_heads, num_kv_heads, float(scale),
        float(logits_soft_cap) if logits_soft_cap is not None else 1.0,
        int(sliding_window) if sliding_window is not None else 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PAGE_SIZE=block_size,
        BLOCK_M=config.block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n,
        NUM_SPLITS=num_kv_splits, DECODE=decode,
        USE_WINDOW=sliding_window is not None, USE_SOFT_CAP=logits_soft_cap is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DOT_IN_FP32=query.device.type != "cuda" and query.dtype == torch.bfloat16,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(query.device, num_tokens),
    )
    if num_kv_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, partial_out, partial_lse, num_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=num_kv_splits, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            num_warps=1 if head_dim_pad <= 128 else 2, **pdl_options(query.device, num_tokens),
        )
    return out


def _validate(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int,
              sliding_window: int | None, logits_soft_cap: float | None, out: torch.Tensor | None,
              num_kv_splits: int | None, seq_order: torch.Tensor | None = None, first_seq: int = 0) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [T, num_heads, head_dim]; got shape {tuple(query.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]; "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"head_dim of the cache ({cache_head_dim}) must equal the query's ({head_dim})")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {_MAX_HEAD_DIM}]; got {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size (k_cache.shape[1]) must be a power of two; got {block_size}")
    if query.dtype not in _SUPPORTED_DTYPES or not (query.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError("query, k_cache and v_cache must share one dtype among float16/bfloat16/float32; "
                         f"got {query.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension; got strides {t.stride()}")
    if seq_lens.dim() != 1 or query_start_loc.dim() != 1 or block_tables.dim() != 2:
        raise ValueError("seq_lens must be [S], query_start_loc [S + 1] and block_tables [S, max_blocks]; got "
                         f"{tuple(seq_lens.shape)}, {tuple(query_start_loc.shape)}, {tuple(block_tables.shape)}")
    num_seqs = seq_lens.shape[0]
    if not 0 <= first_seq <= num_seqs:
        raise ValueError(f"first_seq must be in [0, {num_seqs}]; got {first_seq}")
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] < num_seqs:
        raise ValueError(f"query_start_loc must have S + 1 = {num_seqs + 1} entries and block_tables >= S rows; "
                         f"got {query_start_loc.shape[0]} and {block_tables.shape[0]}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64; got {t.dtype}")
    if block_tables.stride(-1) != 1:
        raise ValueError(f"block_tables must have a contiguous last dimension; got strides {block_tables.stride()}")
    if max_query_len < 0 or max_seq_len < 0:
        raise ValueError(f"max_query_len and max_seq_len must be >= 0; got {max_query_len} and {max_seq_len}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None; got {sliding_window}")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be > 0 or None; got {logits_soft_cap}")
    if num_kv_splits is not None and (num_kv_splits < 1 or num_kv_splits > 256
                                      or num_kv_splits & (num_kv_splits - 1)):
        raise ValueError(f"num_kv_splits must be a power of two in [1, 256] or None; got {num_kv_splits}")
    if out is not None:
        if tuple(out.shape) != tuple(query.shape) or out.dtype != query.dtype or out.stride(-1) != 1:
            raise ValueError(f"out must be {tuple(query.shape)} {query.dtype} with a contiguous last dimension; "
                             f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if seq_order is not None and (seq_order.dim() != 1 or seq_order.shape[0] != seq_lens.shape[0]
                                  or seq_order.dtype not in _INDEX_DTYPES or not seq_order.is_contiguous()):
        raise ValueError(f"seq_order must be a contiguous [S = {seq_lens.shape[0]}] int32/int64 permutation; got "
                         f"{seq_order.dtype} {tuple(seq_order.shape)}")
    tensors = (query, k_cache, v_cache, block_tables, seq_lens, query_start_loc) + ((out,) if out is not None else ())
    tensors += (seq_order,) if seq_order is not None else ()
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")
