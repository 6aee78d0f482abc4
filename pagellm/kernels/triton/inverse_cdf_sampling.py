"""Triton sampling by inverse CDF: temperature (or greedy) over the raw logits, one uniform per row.

A row's token is the first index whose cumulative softmax(logits / T) mass exceeds u * Z, u
uniform in [0, 1): an exact draw up to float32 rounding, with one random number per row instead of
one per vocabulary entry (the Gumbel-max kernel's noise, ~39M Philox words for 256 rows of a 152k
vocabulary, costs more than reading the logits).

Two launches, no [S, V] intermediate:
1. Per tile of BLOCK columns: the tile's max score m_t (base 2: x * log2(e) / T), the first column
   holding it, and its mass z_t = sum 2^(s - m_t). Programs take ITERS tiles each, so that
   even one row spreads over the GPU and large batches do not launch too many programs.
2. Per row: M = max m_t, tile masses z_t 2^(m_t - M), their running sum; the tile where it crosses
   u * Z; then that tile's columns again, their running sum, and the first column past the rest.
   Only entries with mass can be picked, so a masked (-inf) token never is, whatever the rounding.
   Greedy rows (temperature 0) take the first column holding M, as torch.argmax.

The token depends on (seed, row, the row's logits, BLOCK), not on the batch or on ITERS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagellm.kernels.triton.sampling_launch import compile_variants, sample_with_default_launch, token_output


@triton.jit
def _tile_stats_kernel(logits_ptr, temperature_ptr, max_ptr, mass_ptr, arg_ptr, stride_l, vocab_size, num_tiles,
                       BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # Program (row, group of ITERS tiles): each tile's max score (base 2), first argmax and mass.
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    scale = 1.4426950408889634 / tl.where(temperature == 0.0, 1.0, temperature)  # log2(e) / T
    row_ptr = logits_ptr + row.to(tl.int64) * stride_l
    offs = tl.arange(0, BLOCK)
    for i in range(ITERS):
        tile = tl.program_id(1) * ITERS + i
        cols = tile * BLOCK + offs
        s = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32) * scale
        top = tl.max(s, axis=0)
        arg = tl.min(tl.where(s == top, cols, vocab_size), axis=0)
        mass = tl.sum(tl.exp2(s - tl.where(top == float("-inf"), 0.0, top)), axis=0)  # 0 for an all -inf tile
        at = row * num_tiles + tile
        tl.store(max_ptr + at, top, mask=tile < num_tiles)
        tl.store(mass_ptr + at, mass, mask=tile < num_tiles)
        tl.store(arg_ptr + at, arg, mask=tile < num_tiles)


@triton.jit
def _first_crossing(mass, running, target, index, SIZE: tl.constexpr):
    # The first entry with mass whose running sum passes target; else (rounding) the last with mass.
    # Only entries with mass qualify: a parallel float scan need not be monotone, so an entry of zero
    # mass (a masked token) may sum a hair above its predecessor and must never be picked.
    has_mass = mass > 0.0
    first = tl.min(tl.where(has_mass & (running > target), index, SIZE), axis=0)
    return tl.where(first < SIZE, first, tl.max(tl.where(has_mass, index, 0), axis=0))


@triton.jit(do_not_specialize=["seed"])
def _pick_kernel(logits_ptr, temperature_ptr, max_ptr, mass_ptr, arg_ptr, out_ptr, stride_l, vocab_size,
                 num_tiles, seed, seed_ptr, BLOCK: tl.constexpr, TILES_PAD: tl.constexpr,
                 SEED_IN_MEMORY: tl.constexpr):
    # One program per row: the tile where the running mass crosses u * Z, then the column within it.
    # SEED_IN_MEMORY: the seed is read from seed_ptr (a CUDA graph's input), not passed by value.
    row = tl.program_id(0)
    if SEED_IN_MEMORY:
        seed = tl.load(seed_ptr).to(tl.int32)
    temperature = tl.load(temperature_ptr + row)
    offs_t = tl.arange(0, TILES_PAD)
    t_valid = offs_t < num_tiles
    at = row * num_tiles + offs_t
    tile_max = tl.load(max_ptr + at, mask=t_valid, other=float("-inf"))
    top = tl.max(tile_max, axis=0)
    token = tl.min(tl.where(tile_max == top, tl.load(arg_ptr + at, mask=t_valid, other=vocab_size), vocab_size),
                   axis=0)  # the first argmax: greedy rows, and rows with no finite logit
    if (temperature != 0.0) & (top != float("-inf")):
        tile_mass = tl.load(mass_ptr + at, mask=t_valid, other=0.0)
        tile_mass = tl.where(tile_max == float("-inf"), 0.0, tile_mass * tl.exp2(tile_max - top))
        target = tl.rand(seed, row) * tl.sum(tile_mass, axis=0)
        tile = _first_crossing(tile_mass, tl.cumsum(tile_mass, axis=0), target, offs_t, TILES_PAD)
        rest = target - tl.sum(tl.where(offs_t < tile, tile_mass, 0.0), axis=0)
        scale = 1.4426950408889634 / temperature
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        s = tl.load(logits_ptr + row.to(tl.int64) * stride_l + cols, mask=cols < vocab_size,
                    other=float("-inf")).to(tl.float32) * scale
        p = tl.exp2(s - top)
        token = tile * BLOCK + _first_crossing(p, tl.cumsum(p, axis=0), rest, tl.arange(0, BLOCK), BLOCK)
    tl.store(out_ptr + row, token.to(tl.int64))


def compile_all(max_rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Compiles every variant that batches of 1..max_rows rows launch (see compile_variants)."""
    return compile_variants(inverse_cdf_sample, max_rows, vocab_size, dtype, device)


def inverse_cdf_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """One token per row of logits [S, V] (any float dtype): greedy where temperature [S] is 0,
    else a draw from softmax(logits / temperature). `seed` picks the random stream: an int, or a
    [1] int64 tensor on the logits' device holding one in [0, 2**31) (read when the kernel runs, so
    a CUDA graph can take a new seed each replay). The same (seed, logits) gives the same tokens on
    the same kind of device. Returns [S] int64 on the logits' device. No host-device sync."""
    return sample_with_default_launch(inverse_cdf_sample_with, logits, temperature, seed)


def inverse_cdf_sample_with(logits: torch.Tensor, temperature: torch.Tensor, seed: int | torch.Tensor, block: int,
                            iters: int, num_warps: int) -> torch.Tensor:
    """inverse_cdf_sample with an explicit launch config (benchmarks and tests; inputs as there).
    `block` must be a power of two >= 16; tokens depend on it, not on `iters` or `num_warps`."""
    out = token_output(logits, block, iters)
    num_rows, vocab_size = logits.shape
    if num_rows:
        num_tiles = triton.cdiv(vocab_size, block)
        # Three allocations, not views of one: Triton specializes on 16-byte pointer alignment, and
        # a view's offset (rows x tiles x 4 bytes) would make it change with the row count.
        tile_max, tile_mass = (torch.empty(num_rows, num_tiles, dtype=torch.float32, device=logits.device)
                               for _ in range(2))
        tile_arg = torch.empty(num_rows, num_tiles, dtype=torch.int32, device=logits.device)
        temperature = temperature.float()
        _tile_stats_kernel[(num_rows, triton.cdiv(num_tiles, iters))](
            logits, temperature, tile_max, tile_mass, tile_arg, logits.stride(0), vocab_size, num_tiles,
            BLOCK=block, ITERS=iters, num_warps=num_warps)
        in_memory = isinstance(seed, torch.Tensor)
        _pick_kernel[(num_rows,)](
            logits, temperature, tile_max, tile_mass, tile_arg, out, logits.stride(0), vocab_size, num_tiles,
            0 if in_memory else seed & 0x7FFFFFFF, seed if in_memory else out, BLOCK=block,
            TILES_PAD=max(2, triton.next_power_of_2(num_tiles)), SEED_IN_MEMORY=in_memory, num_warps=num_warps)
    return out


sample = inverse_cdf_sample  # the interface layers/sampler.py picks kernels by
sample_in_graph = inverse_cdf_sample  # takes its seed from a device tensor, so a CUDA graph can hold it
