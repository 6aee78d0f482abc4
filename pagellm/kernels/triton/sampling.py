"""Triton sampling for the common case: temperature (or greedy) over the raw logits, one pass per row.

A row's token is argmax(logits / T + G) with G i.i.d. Gumbel(0, 1) noise: the Gumbel-max trick,
an exact draw from softmax(logits / T). The noise comes from Philox counters (seed, position), so
no [S, V] random tensor, softmax or cumulative sum is ever written: the kernel reads the logits
once. Rows with temperature 0 take the plain argmax (ties: the lowest index, as torch.argmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed"])
def _gumbel_argmax_chunk_kernel(logits_ptr, temperature_ptr, best_ptr, best_idx_ptr, stride_l, vocab_size,
                                num_chunks, seed, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # Program (row, chunk of BLOCK * ITERS columns): the chunk's best perturbed score and its index.
    # Rows are cut into chunks so that even a batch of one row fills the GPU.
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        cols = (chunk * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab_size
        x = tl.load(logits_ptr + row * stride_l + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if not greedy:
            u = tl.rand(seed, row * vocab_size + cols)  # [0, 1)
            # Gumbel noise -log(-log(u)); u = 0 gives -inf, so that token cannot win.
            x = x * inv_t - tl.log(-tl.log(u))
        better = x > best  # strict: among equal scores the earlier column keeps its place
        best = tl.where(better, x, best)
        best_idx = tl.where(better, cols, best_idx)
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


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """One token per row of logits [S, V] (any float dtype): greedy where temperature [S] is 0,
    else an exact draw from softmax(logits / temperature). `seed` picks the random stream; the
    same (seed, logits) gives the same tokens. Returns [S] int64 on the logits' device."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [S, V] with a contiguous last dimension; got {tuple(logits.shape)}")
    num_rows, vocab_size = logits.shape
    if temperature.shape != (num_rows,):
        raise ValueError(f"temperature must be [{num_rows}]; got {tuple(temperature.shape)}")
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        block = min(1024, triton.next_power_of_2(vocab_size))
        iters = 4 if logits.is_cuda else 1
        num_chunks = triton.cdiv(vocab_size, block * iters)
        best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
        best_idx = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
        _gumbel_argmax_chunk_kernel[(num_rows, num_chunks)](
            logits, temperature.float(), best, best_idx, logits.stride(0), vocab_size, num_chunks,
            seed & 0x7FFFFFFF, BLOCK=block, ITERS=iters, num_warps=4)
        _reduce_chunks_kernel[(num_rows,)](best, best_idx, out, num_chunks, vocab_size,
                                           CHUNKS_PAD=max(2, triton.next_power_of_2(num_chunks)), num_warps=1)
    return out
