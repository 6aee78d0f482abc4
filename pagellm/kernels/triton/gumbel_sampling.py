"""Triton sampling by Gumbel-max (PAGELLM_SAMPLER_KERNEL=gumbel): temperature (or greedy) over the raw
logits, one pass per row (the default sampler is kernels/triton/inverse_cdf_sampling.py).

A row's token is argmax(logits / T + G) with G i.i.d. Gumbel(0, 1) noise: the Gumbel-max trick,
an exact draw from softmax(logits / T). The noise comes from Philox counters (seed, row, column), so
no [S, V] random tensor, softmax or cumulative sum is ever written: the kernel reads the logits
once. Rows with temperature 0 take the plain argmax (ties: the lowest index, as torch.argmax).

Making the noise, not the read, cheap (at 256 rows x 152k vocab the random numbers, ~39M a step,
cost more than reading the logits):

- One Philox call yields four 32-bit words (tl.randint4x). A tile of BLOCK columns is four sub-tiles
  of BLOCK // 4; column j of sub-tile k takes word k of counter (row, tile * BLOCK // 4 + j). Each
  (row, column) owns one word of one counter, so all noise is independent, and a token depends only
  on (seed, row, its logits, BLOCK): not on the batch size or the chunking (ITERS).
- Scores are kept in base 2. With G = -ln E, E ~ Exp(1): argmax(x / T - ln E) =
  argmax(x * log2(e) / T - log2(E)) (a division by ln 2, a monotone map), so the logarithms are
  base-2 ones, the GPU's native instruction. Every chunk of a row uses this same scale, so chunk
  maxima compare directly.
- E = -ln(1 - v) for v uniform in (0, 1], formed from the word so that it keeps its digits near 0.
  The races are won by the smallest E, exactly where 1 - v would round them away, so for v < 1/8
  E comes from its series (relative error < 1e-7) and only larger v take the logarithm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagellm.kernels.triton.sampling_launch import compile_variants, sample_with_default_launch, token_output


@triton.jit
def _neg_log2_exponential(bits):
    """-log2(E) for E ~ Exp(1) made from uint32 random words (elementwise): Gumbel noise / ln 2."""
    # v = (bits + 1/2) / 2^32 in float32: uniform in (0, 1], exact near 0 where the winners are.
    v = bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    # E = -ln(1 - v) = v (1 + v/2 + v^2/3 + ...); seven terms leave < 1e-7 relative error at v = 1/8.
    series = v * (1.0 + v * (0.5 + v * (0.33333334 + v * (0.25 + v * (0.2 + v * (0.16666667 + v * 0.14285715))))))
    # Above 1/8, 1 - v is exact enough; the floor only catches v rounded up to 1 (p ~ 3e-8), a far loser.
    direct = -0.6931471805599453 * tl.log2(tl.maximum(1.0 - v, 1.4901161193847656e-08))
    return -tl.log2(tl.where(v < 0.125, series, direct))


@triton.jit
def _keep_first_max(best, best_idx, score, cols):
    # Strict: among equal scores the earlier column (visited first) keeps its place.
    better = score > best
    return tl.where(better, score, best), tl.where(better, cols, best_idx)


@triton.jit(do_not_specialize=["seed"])
def _gumbel_argmax_chunk_kernel(logits_ptr, temperature_ptr, best_ptr, best_idx_ptr, stride_l, vocab_size,
                                num_chunks, seed, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # Program (row, chunk of ITERS tiles of BLOCK columns): the chunk's best score (base 2) and its index.
    # Rows are cut into chunks so that even a batch of one row fills the GPU.
    QUARTER: tl.constexpr = BLOCK // 4
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    scale = 1.4426950408889634 / tl.where(greedy, 1.0, temperature)  # log2(e) / T
    row_ptr = logits_ptr + row.to(tl.int64) * stride_l
    counter_row = row.to(tl.int64) << 32  # randint4x splits the offset: low word column, high word row
    offs = tl.arange(0, QUARTER)
    best = tl.full([QUARTER], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([QUARTER], dtype=tl.int32)
    for i in range(ITERS):
        tile = chunk * ITERS + i
        cols = tile * BLOCK + offs                                                   # [Q] sub-tile 0
        x0 = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
        x1 = tl.load(row_ptr + cols + QUARTER, mask=cols + QUARTER < vocab_size, other=float("-inf")).to(tl.float32)
        x2 = tl.load(row_ptr + cols + 2 * QUARTER, mask=cols + 2 * QUARTER < vocab_size,
                     other=float("-inf")).to(tl.float32)
        x3 = tl.load(row_ptr + cols + 3 * QUARTER, mask=cols + 3 * QUARTER < vocab_size,
                     other=float("-inf")).to(tl.float32)
        if not greedy:
            r0, r1, r2, r3 = tl.randint4x(seed, counter_row + tile * QUARTER + offs)
            # A -inf logit stays -inf (the noise is always finite): masked tokens never win.
            x0 = x0 * scale + _neg_log2_exponential(r0)
            x1 = x1 * scale + _neg_log2_exponential(r1)
            x2 = x2 * scale + _neg_log2_exponential(r2)
            x3 = x3 * scale + _neg_log2_exponential(r3)
        best, best_idx = _keep_first_max(best, best_idx, x0, cols)
        best, best_idx = _keep_first_max(best, best_idx, x1, cols + QUARTER)
        best, best_idx = _keep_first_max(best, best_idx, x2, cols + 2 * QUARTER)
        best, best_idx = _keep_first_max(best, best_idx, x3, cols + 3 * QUARTER)
    top = tl.max(best, axis=0)
    index = tl.min(tl.where(best == top, best_idx, vocab_size), axis=0)  # lowest index among ties
    tl.store(best_ptr + row * num_chunks + chunk, top)
    tl.store(best_idx_ptr + row * num_chunks + chunk, index)


@triton.jit
def _reduce_chunks_kernel(best_ptr, best_idx_ptr, out_ptr, num_chunks, vocab_size, CHUNKS_PAD: tl.constexpr):
    # One program per row: the best chunk (lowest index among ties, as torch.argmax).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS_PAD)
    mask = offs < num_chunks
    best = tl.load(best_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
    idx = tl.load(best_idx_ptr + row * num_chunks + offs, mask=mask, other=vocab_size)
    top = tl.max(best, axis=0)
    index = tl.min(tl.where(best == top, idx, vocab_size), axis=0)
    tl.store(out_ptr + row, index.to(tl.int64))


def compile_all(max_rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Compiles every variant that batches of 1..max_rows rows launch (see compile_variants)."""
    return compile_variants(gumbel_sample, max_rows, vocab_size, dtype, device)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """One token per row of logits [S, V] (any float dtype): greedy where temperature [S] is 0,
    else an exact draw from softmax(logits / temperature). `seed` picks the random stream; the
    same (seed, logits) gives the same tokens on the same kind of device. Returns [S] int64 on the
    logits' device."""
    return sample_with_default_launch(gumbel_sample_with, logits, temperature, seed)


def gumbel_sample_with(logits: torch.Tensor, temperature: torch.Tensor, seed: int, block: int, iters: int,
                       num_warps: int) -> torch.Tensor:
    """gumbel_sample with an explicit launch config (benchmarks and tests; inputs as gumbel_sample's).
    `block` must be a power of two >= 16; tokens depend on it, not on `iters` or `num_warps`."""
    out = token_output(logits, block, iters)
    num_rows, vocab_size = logits.shape
    if num_rows:
        num_chunks = triton.cdiv(vocab_size, block * iters)
        best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
        best_idx = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
        _gumbel_argmax_chunk_kernel[(num_rows, num_chunks)](
            logits, temperature.float(), best, best_idx, logits.stride(0), vocab_size, num_chunks,
            seed & 0x7FFFFFFF, BLOCK=block, ITERS=iters, num_warps=num_warps)
        _reduce_chunks_kernel[(num_rows,)](best, best_idx, out, num_chunks, vocab_size,
                                           CHUNKS_PAD=max(2, triton.next_power_of_2(num_chunks)), num_warps=1)
    return out


sample = gumbel_sample  # the interface layers/sampler.py picks kernels by
