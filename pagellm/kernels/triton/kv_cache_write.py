"""Triton kernel that scatters a step's new keys and values into the paged KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    # One program per token: it moves all of the token's heads at once, [BLOCK_H, BLOCK_D].
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)

    src = token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    k = tl.load(key_ptr + src, mask=mask)
    dst = block * stride_kc_block + offset * stride_kc_slot + offs_h[:, None] * stride_kc_head + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)

    src = token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    v = tl.load(value_ptr + src, mask=mask)
    dst = block * stride_vc_block + offset * stride_vc_slot + offs_h[:, None] * stride_vc_head + offs_d[None, :]
    tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores token t's key/value at cache slot `slot_mapping[t]` (block * block_size + offset).

    key/value: [T, num_kv_heads, head_dim], any strides with a contiguous last dim (views of a fused
    qkv projection are fine). k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim] of
    the same dtype, contiguous last dim. slot_mapping: [T'] int32/int64 with T' <= T; slots < 0 are
    padding and skipped, tokens past T' too. Mutates the caches in place; launches one kernel, no
    host-device sync (slot values are not range-checked: they must lie inside the cache).

    Raises ValueError when shapes, dtypes, devices or layouts disagree.
    """
    _validate(key, value, k_cache, v_cache, slot_mapping)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    block_d = triton.next_power_of_2(head_dim)
    block_h = triton.next_power_of_2(num_kv_heads)
    # ~4 elements per thread keeps every lane busy without register pressure.
    num_warps = max(1, min(8, block_h * block_d // 128))
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        PAGE_SIZE=block_size, num_warps=num_warps,
    )


def _validate(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]; "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size (k_cache.shape[1]) must be a power of two; got {block_size}")
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [T, {num_kv_heads}, {head_dim}] to match the cache; "
                             f"got {tuple(t.shape)}")
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension; got strides {t.stride()}")
    if value.shape[0] != key.shape[0]:
        raise ValueError(f"key and value must hold the same tokens; got {key.shape[0]} and {value.shape[0]}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(3) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension; got strides {t.stride()}")
    if k_cache.dtype not in _SUPPORTED_DTYPES or not (key.dtype == value.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError("key, value, k_cache and v_cache must share one dtype among float16/bfloat16/float32; "
                         f"got {key.dtype}, {value.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be a 1-D int32/int64 tensor; got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if slot_mapping.shape[0] > key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but key holds only {key.shape[0]} tokens")
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")
