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
def _gumbel_argmax_kernel(logits_ptr, temperature_ptr, out_ptr, stride_l, vocab_size, seed,
                          BLOCK: tl.constexpr):
    # One program per row; a running (best score, its index) over the vocabulary in BLOCK chunks.
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab_size
        x = tl.load(logits_ptr + row * stride_l + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if not greedy:
            u = tl.rand(seed, row * vocab_size + cols)  # [0, 1)
            # Gumbel noise -log(-log(u)); u = 0 gives -inf, so that token cannot win.
            x = x * inv_t - tl.log(-tl.log(u))
        better = x > best  # strict: among equal scores the earliest chunk keeps its index
        best = tl.where(better, x, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best, axis=0)
    # Lowest index among the lanes holding the maximum (ties in the greedy case).
    index = tl.min(tl.where(best == top, best_idx, vocab_size), axis=0)
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
        block = min(2048, triton.next_power_of_2(vocab_size))
        _gumbel_argmax_kernel[(num_rows,)](logits, temperature.float(), out, logits.stride(0), vocab_size,
                                            seed & 0x7FFFFFFF, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out
