"""The attention layer a model holds: it owns no weights, only its view of the KV cache."""

from __future__ import annotations

import torch
from torch import nn

from pagellm.layers.attention.backend import AttentionBackend, AttentionMetadata


class PagedAttention(nn.Module):
    """Stores new K/V in this layer's cache blocks and attends over the sequence's whole context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        # Bound by the model runner once the cache is allocated.
        self.backend: AttentionBackend | None = None
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                kv_written: bool = False) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]. `kv_written`: the caller's kernel already stored
        k/v in this layer's cache (the fused RoPE kernel does), so the backend skips its write."""
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale,
                                    self.sliding_window, self.logits_soft_cap, kv_written=kv_written)
