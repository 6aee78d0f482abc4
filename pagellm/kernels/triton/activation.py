"""Triton SiLU-and-mul: [gate | up] -> silu(gate) * up in one pass (the unfused path takes two)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    # Program (row, block of columns).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # SiLU rounded to the model's dtype before the multiply, as the unfused ops round it.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2 * d] = [gate | up] -> silu(gate) * up  [T, d] (last dimension contiguous)."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, 2 * d] with a contiguous last dimension; got {tuple(x.shape)}")
    num_rows, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_rows, d, dtype=x.dtype, device=x.device)
    if num_rows:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(num_rows, triton.cdiv(d, block))](x, out, x.stride(0), out.stride(0), d,
                                                                 BLOCK=block, num_warps=4)
    return out
