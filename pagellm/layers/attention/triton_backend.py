"""GPU attention through the Triton kernels: cache write by slot mapping, then one paged-attention
launch for the whole mixed step. No host-device sync; CUDA-graph capturable."""

from __future__ import annotations

import torch

from pagellm.kernels.triton.kv_cache_write import write_kv_cache
from pagellm.kernels.triton.paged_attention import paged_attention
from pagellm.layers.attention.backend import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None, logits_soft_cap: float | None = None,
                kv_written: bool = False) -> torch.Tensor:
        if not kv_written:
            write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               meta.max_query_len, meta.max_seq_len, scale, sliding_window, logits_soft_cap,
                               seq_order=meta.seq_order)
