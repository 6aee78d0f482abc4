"""Triton rotary embedding for q and k in place, with the per-head q/k RMSNorm (Qwen3, Gemma 3) fused in.

The unfused path costs, per layer, a gather and cast of cos/sin, a negate, a concat, two multiplies
and an add for each of q and k, plus two norms: a dozen launches that this does in one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr,
    stride_t, stride_h, stride_cs,
    num_q_heads, num_rotated_heads, eps, weight_offset,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr,
):
    # Program (token, block of BLOCK_H heads among the q heads then the k heads).
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                      # [H]
    offs = tl.arange(0, HALF_PAD)                                                   # [D/2]
    d_mask = offs < HALF
    mask = (heads < num_rotated_heads)[:, None] & d_mask[None, :]
    base = qkv_ptr + token * stride_t + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)                                        # [H, D/2]
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if HAS_NORM:
        is_q = (heads < num_q_heads)[:, None]
        w1 = tl.where(is_q, tl.load(q_weight_ptr + offs, mask=d_mask, other=0.0)[None, :],
                      tl.load(k_weight_ptr + offs, mask=d_mask, other=0.0)[None, :]).to(tl.float32)
        w2 = tl.where(is_q, tl.load(q_weight_ptr + HALF + offs, mask=d_mask, other=0.0)[None, :],
                      tl.load(k_weight_ptr + HALF + offs, mask=d_mask, other=0.0)[None, :]).to(tl.float32)
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)  # [H]
        # Rounded to the model's dtype between norm and rotation, as the unfused path stores it.
        x1 = (x1 * inv_rms[:, None] * (w1 + weight_offset)).to(dtype).to(tl.float32)
        x2 = (x2 * inv_rms[:, None] * (w2 + weight_offset)).to(dtype).to(tl.float32)
    pos = tl.load(positions_ptr + token)
    cs = cos_sin_ptr + pos * stride_cs + offs                                       # cos row, then sin row
    cos1 = tl.load(cs, mask=d_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    cos2 = tl.load(cs + HALF, mask=d_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin1 = tl.load(cs + 2 * HALF, mask=d_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin2 = tl.load(cs + 3 * HALF, mask=d_mask, other=0.0).to(dtype).to(tl.float32)[None, :]
    tl.store(base, (x1 * cos1 - x2 * sin1).to(dtype), mask=mask)
    tl.store(base + HALF, (x2 * cos2 + x1 * sin2).to(dtype), mask=mask)


def qk_norm_rope_(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, q_weight: torch.Tensor | None = None,
                  k_weight: torch.Tensor | None = None, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
    """Rotates (after an optional per-head RMSNorm) the q and k heads of a fused qkv tensor, in place.

    Args:
        qkv: [T, num_q_heads + 2 * num_kv_heads, D]: q heads, then k heads, then v heads (untouched).
            The last dimension must be contiguous.
        positions: [T] int, each token's position.
        cos_sin_cache: [P, 2, D] fp32: cos then sin of every position over the full head width, in
            the non-interleaved (HF Llama) layout; the whole head rotates.
        q_weight, k_weight: [D] RMSNorm weights of q and k (both or neither); the norm uses
            weight + weight_offset and `eps`.
    """
    if qkv.dim() != 3 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [T, heads, head_dim] with a contiguous last dimension; got {tuple(qkv.shape)}")
    num_tokens, num_heads, head_dim = qkv.shape
    if num_heads < num_q_heads + 2 * num_kv_heads:
        raise ValueError(f"qkv has {num_heads} heads; expected num_q_heads + 2 * num_kv_heads = "
                         f"{num_q_heads + 2 * num_kv_heads}")
    if head_dim % 2 or cos_sin_cache.dim() != 3 or tuple(cos_sin_cache.shape[1:]) != (2, head_dim):
        raise ValueError(f"cos_sin_cache must be [P, 2, {head_dim}] and head_dim even; got "
                         f"{tuple(cos_sin_cache.shape)}")
    if not cos_sin_cache.is_contiguous():
        raise ValueError("cos_sin_cache must be contiguous")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight must be given together")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must be [{num_tokens}]; got {tuple(positions.shape)}")
    if num_tokens == 0:
        return
    rotated = num_q_heads + num_kv_heads
    half = head_dim // 2
    block_h = min(triton.next_power_of_2(rotated), max(1, 2048 // triton.next_power_of_2(half)))
    has_norm = q_weight is not None
    _qk_norm_rope_kernel[(num_tokens, triton.cdiv(rotated, block_h))](
        qkv, positions, cos_sin_cache,
        q_weight if has_norm else cos_sin_cache, k_weight if has_norm else cos_sin_cache,
        qkv.stride(0), qkv.stride(1), cos_sin_cache.stride(0),
        num_q_heads, rotated, float(eps), float(weight_offset),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), BLOCK_H=block_h, HAS_NORM=has_norm,
        num_warps=4,
    )
