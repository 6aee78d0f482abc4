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
    k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_t, stride_h, stride_cs,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    num_q_heads, num_rotated_heads, num_heads, eps, weight_offset,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr,
    WRITE_CACHE: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    # Program (token, block of BLOCK_H heads among the q heads, then the k heads, then (when it also
    # stores the token's K/V in the paged cache) the v heads, which it copies unrotated).
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                      # [H]
    offs = tl.arange(0, HALF_PAD)                                                   # [D/2]
    d_mask = offs < HALF
    mask = (heads < num_heads)[:, None] & d_mask[None, :]
    rotates = (heads < num_rotated_heads)[:, None]                                  # q and k heads
    base = qkv_ptr + token * stride_t + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)                                        # [H, D/2]
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    v1 = x1
    v2 = x2
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
    y1 = (x1 * cos1 - x2 * sin1).to(dtype)
    y2 = (x2 * cos2 + x1 * sin2).to(dtype)
    rot_mask = mask & rotates
    tl.store(base, y1, mask=rot_mask)
    tl.store(base + HALF, y2, mask=rot_mask)
    if WRITE_CACHE:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:  # slot -1: a padding token
            is_k = (heads >= num_q_heads) & (heads < num_rotated_heads)             # [H]
            is_v = heads >= num_rotated_heads
            kv_head = tl.where(is_k, heads - num_q_heads, heads - num_rotated_heads)
            dst = ((slot // PAGE_SIZE) * stride_cache_block + (slot % PAGE_SIZE) * stride_cache_slot
                   + kv_head[:, None] * stride_cache_head + offs[None, :])
            k_mask = mask & is_k[:, None]
            v_mask = mask & is_v[:, None]
            tl.store(k_cache_ptr + dst, y1, mask=k_mask)
            tl.store(k_cache_ptr + dst + HALF, y2, mask=k_mask)
            tl.store(v_cache_ptr + dst, v1, mask=v_mask)
            tl.store(v_cache_ptr + dst + HALF, v2, mask=v_mask)


def qk_norm_rope_(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, q_weight: torch.Tensor | None = None,
                  k_weight: torch.Tensor | None = None, eps: float = 1e-6, weight_offset: float = 0.0,
                  kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Rotates (after an optional per-head RMSNorm) the q and k heads of a fused qkv tensor, in place.

    Args:
        qkv: [T, num_q_heads + 2 * num_kv_heads, D]: q heads, then k heads, then v heads (untouched).
            The last dimension must be contiguous.
        positions: [T] int, each token's position.
        cos_sin_cache: [P, 2, D] fp32: cos then sin of every position over the full head width, in
            the non-interleaved (HF Llama) layout; the whole head rotates.
        q_weight, k_weight: [D] RMSNorm weights of q and k (both or neither); the norm uses
            weight + weight_offset and `eps`.
        kv_cache: optional (k_cache, v_cache, slot_mapping): the same launch also stores each
            token's rotated key and its value at cache slot slot_mapping[t] (as write_kv_cache
            does: caches [num_blocks, block_size, num_kv_heads, D] of qkv's dtype, slot_mapping [T],
            slots < 0 skipped).
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
    if kv_cache is not None:
        validate_kv_cache(kv_cache, num_tokens, num_kv_heads, head_dim, qkv.dtype)
    if num_tokens == 0:
        return
    rotated = num_q_heads + num_kv_heads
    touched = rotated + (num_kv_heads if kv_cache is not None else 0)
    half = head_dim // 2
    block_h = min(triton.next_power_of_2(touched), max(1, 2048 // triton.next_power_of_2(half)))
    has_norm = q_weight is not None
    k_cache, v_cache, slots = kv_cache if kv_cache is not None else (qkv, qkv, positions)
    cache_strides = k_cache.stride()[:3] if kv_cache is not None else (0, 0, 0)
    _qk_norm_rope_kernel[(num_tokens, triton.cdiv(touched, block_h))](
        qkv, positions, cos_sin_cache,
        q_weight if has_norm else cos_sin_cache, k_weight if has_norm else cos_sin_cache,
        k_cache, v_cache, slots,
        qkv.stride(0), qkv.stride(1), cos_sin_cache.stride(0), *cache_strides,
        num_q_heads, rotated, touched, float(eps), float(weight_offset),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), BLOCK_H=block_h, HAS_NORM=has_norm,
        WRITE_CACHE=kv_cache is not None, PAGE_SIZE=k_cache.shape[1] if kv_cache is not None else 1,
        num_warps=4,
    )


def validate_kv_cache(kv_cache, num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    k_cache, v_cache, slot_mapping = kv_cache
    if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, {num_kv_heads}, {head_dim}]; "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share strides, with a contiguous last dimension")
    block_size = k_cache.shape[1]
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size (k_cache.shape[1]) must be a power of two; got {block_size}")
    if k_cache.dtype != dtype or v_cache.dtype != dtype:
        raise ValueError(f"the caches must have qkv's dtype {dtype}; got {k_cache.dtype} and {v_cache.dtype}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be [{num_tokens}] int32/int64; got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
