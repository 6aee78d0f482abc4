"""GPU attention through the Triton kernels: cache write by slot mapping, then paged attention.

A mixed step attends in two launches: its decode sequences (the leading `num_decodes`) with the
decode kernel's small row tiles, and its prefill chunks with large ones. In one launch every decode
token would take a whole prefill tile (128 rows for its G query heads): on the H200 gpu-thr run,
200 decodes riding along a 16k-token chunk took attention from 0.49 to 0.67 ms per layer.
No host-device sync; CUDA-graph capturable.
"""

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
        d = meta.num_decodes
        if meta.max_query_len <= 1 or not 0 < d < meta.seq_lens.shape[0]:
            return paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                   meta.query_start_loc, meta.max_query_len, meta.max_seq_len, scale,
                                   sliding_window, logits_soft_cap, seq_order=meta.seq_order)
        out = torch.empty_like(query)  # [T, H, D]
        # Decodes: sequences [0, d), rows [0, d); the slices keep the tensors' addresses. No split-KV
        # (the step is long anyway), so the launch has one kernel variant (two with PDL's rule).
        paged_attention(query[:d], k_cache, v_cache, meta.block_tables[:d], meta.seq_lens[:d],
                        meta.query_start_loc[:d + 1], 1, meta.max_seq_len, scale, sliding_window,
                        logits_soft_cap, out=out[:d], num_kv_splits=1)
        return paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               meta.max_query_len, meta.max_seq_len, scale, sliding_window, logits_soft_cap,
                               out=out, first_seq=d)
