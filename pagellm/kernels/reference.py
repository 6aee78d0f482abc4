"""Plain PyTorch reference ops for the paged KV cache: the test oracle for the Triton kernels.

These loop over sequences on the host and favour being obviously right over being fast. The layout
they read and write is the engine's (see `pagellm.kernels.triton.paged_attention`):

- caches `k_cache`, `v_cache`: [num_blocks, block_size, num_kv_heads, head_dim];
  slot = block_id * block_size + offset.
- one step is flattened: query [T, num_heads, head_dim], key/value [T, num_kv_heads, head_dim],
  tokens grouped per sequence in order; `query_start_loc` [S + 1] holds cumulative query lengths,
  `seq_lens` [S] the context length of each sequence including this step's tokens.
"""

from __future__ import annotations

import torch


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores token t's key/value at cache slot `slot_mapping[t]`; slots < 0 are padding and skipped.

    key/value [T, num_kv_heads, head_dim]; slot_mapping [T'] with T' <= T (tokens past T' are
    padding). Mutates `k_cache` and `v_cache` in place.
    """
    block_size = k_cache.shape[1]
    num_slots = slot_mapping.shape[0]
    slots = slot_mapping.long()
    keep = slots >= 0                                     # [T']
    slots = slots[keep]                                   # [N]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[:num_slots][keep].to(k_cache.dtype)    # [N, Hkv, D]
    v_cache[blocks, offsets] = value[:num_slots][keep].to(v_cache.dtype)


def paged_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, scale: float,
                        sliding_window: int | None = None,
                        logits_soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of each query token over its sequence's cached keys, computed in fp32.

    Query token i of sequence s sits at position seq_lens[s] - query_len[s] + i and sees keys at
    positions 0..its own (and, with `sliding_window=W`, only those > position - W). With
    `logits_soft_cap=c` the scaled scores become c * tanh(scores / c) before the softmax. A row
    that sees no key (a sequence with seq_len 0) comes out as zeros. Returns [T, num_heads, head_dim]
    in the query's dtype; rows of tokens outside `query_start_loc[-1]` are zeros.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len == 0 or seq_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[s, :num_blocks].long()                              # [nb]
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()   # [L, Hkv, D]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()   # [L, Hkv, D]
        k = k.repeat_interleave(group, dim=1)                                        # [L, H, D]
        v = v.repeat_interleave(group, dim=1)                                        # [L, H, D]
        q = query[q_start:q_end].float()                                             # [Q, H, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale                          # [H, Q, L]
        if logits_soft_cap is not None:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]  # [Q, 1]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]                   # [1, L]
        visible = k_pos <= q_pos                                                      # [Q, L]
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)                          # [H, Q, L]
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v)                    # [Q, H, D]
    return out.to(query.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0,
                 residual: torch.Tensor | None = None):
    """The oracle of `kernels.triton.rms_norm.rms_norm`: (norm(x + residual), x + residual) or norm(x)."""
    s = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    f = s.float()
    out = (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + weight_offset)).to(x.dtype)
    return out if residual is None else (out, s)


def qk_norm_rope_ref(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, q_weight: torch.Tensor | None = None,
                     k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                     weight_offset: float = 0.0) -> torch.Tensor:
    """The oracle of `kernels.triton.rotary.qk_norm_rope_`: returns a rotated copy of qkv."""
    out = qkv.clone()
    rotated = num_q_heads + num_kv_heads
    x = qkv[:, :rotated].float()  # [T, H + Hkv, D]
    if q_weight is not None:
        w = torch.cat([q_weight.float().expand(num_q_heads, -1), k_weight.float().expand(num_kv_heads, -1)])
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w + weight_offset)
        x = x.to(qkv.dtype).float()
    cs = cos_sin_cache[positions].to(qkv.dtype).float()  # [T, 2, D]
    cos, sin = cs[:, 0, None, :], cs[:, 1, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    out[:, :rotated] = (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(qkv.dtype)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """The oracle of `kernels.triton.activation.silu_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)
