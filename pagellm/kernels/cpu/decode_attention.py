"""Paged decode attention on the CPU through a small C kernel (paged_decode.c), built at first use.

The portable path gathers each sequence's K/V blocks into one tensor and runs SDPA: on the CPU the
gather alone was ~40% of a long-context decode step. The C kernel reads the blocks in place, one
(sequence, KV head) per OpenMP work item. It is compiled at first use (kernels/cpu/build.py);
where that fails, `load()` returns None and the caller keeps the portable path.
PAGELLM_CPU_ATTENTION_KERNEL=0 turns it off.
"""

from __future__ import annotations

import ctypes

import torch

from pagellm.kernels.cpu.build import load_library

# The kernel's compiled limits (MAX_HEAD_DIM, MAX_GROUP, MAX_BLOCK in paged_decode.c).
MAX_HEAD_DIM, MAX_GROUP, MAX_BLOCK = 256, 16, 64
_DTYPES = (torch.bfloat16, torch.float32)


_SIGNATURES = (("paged_decode_attention", ctypes.c_int,
                tuple([ctypes.c_void_p] * 6 + [ctypes.c_int] * 5 + [ctypes.c_int64] * 8
                      + [ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int])),)


def load() -> ctypes.CDLL | None:
    """The compiled kernel library (built and loaded once: load_library caches it), or None where
    it is switched off or cannot be built."""
    return load_library("paged_decode", "PAGELLM_CPU_ATTENTION_KERNEL", _SIGNATURES)


def supports(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these shapes and dtypes (CPU, bf16/fp32, within its limits)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    return (query.device.type == "cpu" and query.dtype in _DTYPES and k_cache.dtype == query.dtype
            and head_dim <= MAX_HEAD_DIM and block_size <= MAX_BLOCK and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= MAX_GROUP and query.stride(-1) == 1 and k_cache.stride(-1) == 1
            and load() is not None)


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, logits_soft_cap: float | None = None,
                           kv_heads_per_item: int | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    query [S, H, D] (last dim contiguous); caches [num_blocks, block_size, Hkv, D], query's dtype,
    same strides; block_tables [>= S, width] int32; seq_lens [S] int32 (including the query's own
    position, whose K/V are cached). Returns [S, H, D]. Call `supports()` first.
    `kv_heads_per_item` (a divisor of Hkv) fixes how the work is cut; None picks whole sequences
    when there are enough for every thread, else one KV head per work item.
    """
    lib = load()
    if lib is None or not supports(query, k_cache):
        raise ValueError("the CPU decode-attention kernel does not take these inputs; check supports() first")
    if k_cache.stride() != v_cache.stride() or v_cache.dtype != k_cache.dtype:
        raise ValueError("k_cache and v_cache must share dtype and strides")
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    tables = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    if tables.stride(-1) != 1:
        tables = tables.contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=query.dtype)
    if num_seqs == 0:
        return out
    kv_per_item = kv_heads_per_item or (num_kv_heads if num_seqs >= 4 * torch.get_num_threads() else 1)
    if num_kv_heads % kv_per_item:
        raise ValueError(f"kv_heads_per_item must divide num_kv_heads ({num_kv_heads}); got {kv_per_item}")
    status = lib.paged_decode_attention(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        tables.data_ptr(), lens.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, block_size,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        float(scale), int(sliding_window or 0), float(logits_soft_cap or 0.0),
        1 if query.dtype == torch.bfloat16 else 0, kv_per_item)
    if status != 0:
        raise ValueError("the CPU decode-attention kernel rejected the sizes")
    return out
