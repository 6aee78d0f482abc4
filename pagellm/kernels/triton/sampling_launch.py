"""What the Triton samplers of plain rows share (kernels/triton/gumbel_sampling.py, Gumbel-max, and
kernels/triton/inverse_cdf_sampling.py): their input checks, how a batch's vocabulary is cut into
tiles and programs, and the start-up compile of every variant a batch size can launch."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

# Columns per tile on the GPU: 4 warps a program, 8-16 byte loads per thread. A measured sweep
# (benchmarks/kernels/bench_sampling.py --sweep) is what should move this.
GPU_BLOCK = 2048
NUM_WARPS = 4
# Enough programs to fill an H200 (132 SMs) about 8 four-warp programs deep; beyond that, tiles
# are grouped ITERS to a program so fewer per-program results are written and reduced.
_MIN_PROGRAMS = 1024
_MAX_ITERS = 4

Sample = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def launch_config(num_rows: int, vocab_size: int, is_cuda: bool) -> tuple[int, int]:
    """(BLOCK, ITERS) for a batch of num_rows rows: columns per tile, tiles per program."""
    # The interpreter (CPU) runs programs one by one: small tiles, one per program.
    block = min(GPU_BLOCK if is_cuda else 256, max(16, triton.next_power_of_2(vocab_size)))
    if not is_cuda:
        return block, 1
    tiles = triton.cdiv(vocab_size, block)
    iters = 1
    while iters < _MAX_ITERS and num_rows * triton.cdiv(tiles, 2 * iters) >= _MIN_PROGRAMS:
        iters *= 2
    return block, iters


def check_inputs(logits: torch.Tensor, temperature: torch.Tensor) -> None:
    """ValueError unless logits is [S, V] with a contiguous last dimension and temperature [S]."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [S, V] with a contiguous last dimension; got {tuple(logits.shape)}")
    if temperature.shape != (logits.shape[0],):
        raise ValueError(f"temperature must be [{logits.shape[0]}]; got {tuple(temperature.shape)}")


def token_output(logits: torch.Tensor, block: int, iters: int) -> torch.Tensor:
    """The [S] int64 tokens tensor a launch of logits [S, V] fills; ValueError unless block is a
    power of two >= 16 and iters >= 1."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16; got {block}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1; got {iters}")
    return torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)


def sample_with_default_launch(sample_with, logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """Checks a batch and calls sample_with(logits, temperature, seed, BLOCK, ITERS, NUM_WARPS) with
    launch_config's choice for it."""
    check_inputs(logits, temperature)
    block, iters = launch_config(*logits.shape, logits.is_cuda)
    return sample_with(logits, temperature, seed, block, iters, NUM_WARPS)


def compile_variants(sample: Sample, max_rows: int, vocab_size: int, dtype: torch.dtype,
                     device: torch.device) -> int:
    """Runs `sample` once per launch config that batches of 1..max_rows rows use (ITERS, and what
    depends on it, change with the row count), so no variant compiles in the middle of serving;
    returns how many ran. Call once at start-up on CUDA."""
    first_rows: dict[tuple[int, int], int] = {}
    for rows in range(1, max_rows + 1):
        first_rows.setdefault(launch_config(rows, vocab_size, device.type == "cuda"), rows)
    temperature = torch.ones(max(first_rows.values()), dtype=torch.float32, device=device)
    for rows in first_rows.values():
        sample(torch.zeros(rows, vocab_size, dtype=dtype, device=device), temperature[:rows], 0)
    return len(first_rows)
