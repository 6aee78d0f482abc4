"""Triton grouped matmul for mixture-of-experts layers.

The T * k (token, choice) pairs are sorted by expert and each expert's group is padded to a
multiple of BLOCK_M, so every BLOCK_M-row tile belongs to one expert: a program multiplies its
rows by that expert's weight. All of this is computed on the device with shapes known on the host
(the padded length is bounded by T * k + E * (BLOCK_M - 1)), so there is no host sync and the
launch is CUDA-graph safe. Tiles past the last expert's group have expert id -1 and exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_rows"])  # varies per step; see paged_attention.py
def _grouped_matmul_kernel(
    a_ptr, b_ptr, c_ptr, weight_ptr, rows_ptr, tile_expert_ptr,
    N, K, num_rows,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    A_ROW_DIVISOR: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32: tl.dot would otherwise round fp32 inputs to tf32
):
    # C[row, :] = A[row // A_ROW_DIVISOR, :] @ B[expert].T (* weight[row]) for the rows of one tile.
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(rows_ptr + offs_m)  # [BM] pair index; num_rows marks padding
    row_ok = rows < num_rows
    a_rows = (rows // A_ROW_DIVISOR).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)  # [BK, BN]
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (rows [P] int32, tile_expert [P / block_m] int32), P = padded length.

    `rows` lists the flat (token, choice) pair indices grouped by expert, each group padded with
    T * k up to a multiple of block_m; `tile_expert` is each tile's expert, -1 past the last group.
    """
    num_pairs = ids.numel()
    flat = ids.reshape(-1)  # [T k]
    num_tiles = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m)
    # Not bincount: on CUDA it reads the largest id back to the host, which CUDA graphs forbid.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # [T k]
    sorted_ids = flat[order]
    start = torch.cumsum(counts, 0) - counts  # [E] unpadded group starts
    rank = torch.arange(num_pairs, device=ids.device) - start[sorted_ids]  # position inside the group
    rows = torch.full((num_tiles * block_m,), num_pairs, dtype=torch.int32, device=ids.device)
    rows[padded_start[sorted_ids] + rank] = order.to(torch.int32)
    tile_start = torch.arange(num_tiles, device=ids.device) * block_m  # [tiles]
    tile_expert = torch.searchsorted(padded_end, tile_start, right=True)  # [tiles], E past the end
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return rows, tile_expert


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, tile_expert: torch.Tensor,
                   num_rows: int, a_row_divisor: int, weights: torch.Tensor | None = None,
                   block_m: int = 64, block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """c [num_rows, N] with c[r] = a[r // a_row_divisor] @ b[e(r)].T (* weights[r]); b [E, N, K]."""
    n, k = b.shape[1], b.shape[2]
    c = torch.empty(num_rows, n, dtype=a.dtype, device=a.device)
    grid = (tile_expert.shape[0], triton.cdiv(n, block_n))
    w = weights if weights is not None else c  # unread when MUL_WEIGHT is off
    _grouped_matmul_kernel[grid](
        a, b, c, w, rows, tile_expert, n, k, num_rows,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIVISOR=a_row_divisor, MUL_WEIGHT=weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32")
    return c


def default_tiles(num_pairs: int, num_experts: int) -> tuple[int, int, int]:
    """(block_m, block_n, block_k) by (token, choice) pairs per expert; from a sweep on an H200 at
    Mixtral-8x7B shape, bf16 (pagellm.benchmarks.moe --sweep): small tiles while the layer is bound
    by reading weights, large ones once it is bound by math."""
    per_expert = num_pairs / num_experts
    if per_expert < 4:
        return 32, 64, 64
    if per_expert < 64:
        return 64, 64, 64
    return 128, 128, 64


def grouped_moe_triton(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                       ids: torch.Tensor, block_m: int | None = None, block_n: int | None = None,
                       block_k: int | None = None) -> torch.Tensor:
    """x [T, H], gate_up [E, 2 I, H], down [E, H, I], weights/ids [T, k] -> [T, H] (SiLU-gated experts).
    Tile sizes left as None come from `default_tiles`."""
    t, top_k = ids.shape
    auto = default_tiles(t * top_k, gate_up.shape[0])
    block_m, block_n, block_k = block_m or auto[0], block_n or auto[1], block_k or auto[2]
    rows, tile_expert = align_by_expert(ids, gate_up.shape[0], block_m)
    h = grouped_matmul(x, gate_up, rows, tile_expert, t * top_k, top_k,
                       block_m=block_m, block_n=block_n, block_k=block_k)  # [T k, 2 I]
    gate, up = h.chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up  # [T k, I]
    out = grouped_matmul(h, down, rows, tile_expert, t * top_k, 1, weights.reshape(-1).float(),
                         block_m=block_m, block_n=block_n, block_k=block_k)  # [T k, H]
    return out.view(t, top_k, -1).sum(dim=1)
