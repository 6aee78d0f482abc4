"""Portable attention in plain PyTorch (CPU and GPU): gathers each sequence's blocks and runs SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagellm.layers.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None, logits_soft_cap: float | None = None) -> torch.Tensor:
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        # Write the new tokens' K/V into their slots (padding slots are -1 and skipped).
        flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        slots = meta.slot_mapping
        num_tokens = query.shape[0]
        if slots.shape[0] != num_tokens or bool((slots < 0).any()):
            keep = slots >= 0
            slots, key, value = slots[keep], key[: slots.shape[0]][keep], value[: slots.shape[0]][keep]
        flat_k.index_copy_(0, slots, key.to(k_cache.dtype))
        flat_v.index_copy_(0, slots, value.to(v_cache.dtype))

        out = torch.empty_like(query)
        nd = meta.num_decodes
        # Decodes arrive sorted by length; two groups roughly halve the padding each gathers.
        bounds = [0, nd // 2, nd] if nd >= 16 else [0, nd]
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                out[lo:hi] = self._decode(query[lo:hi], k_cache, v_cache, meta.block_tables[lo:hi],
                                          meta.seq_lens[lo:hi], max(meta.seq_lens_cpu[lo:hi]), scale,
                                          sliding_window, logits_soft_cap)
        start = meta.num_decode_tokens
        for s in range(nd, len(meta.query_lens_cpu)):
            q_len, ctx_len = meta.query_lens_cpu[s], meta.seq_lens_cpu[s]
            out[start:start + q_len] = self._prefill(
                query[start:start + q_len], k_cache, v_cache, meta.block_tables[s], ctx_len, scale,
                sliding_window, logits_soft_cap)
            start += q_len
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
        # cache [NB, BS, Hkv, D], block_table [..., >= num_blocks] -> [..., num_blocks * BS, Hkv, D]
        nb_total, bs, hkv, d = cache.shape
        ids = block_table[..., :num_blocks]
        # index_select on whole blocks is a plain row copy, faster than advanced indexing.
        rows = cache.view(nb_total, bs * hkv * d).index_select(0, ids.reshape(-1))  # [n * nb, BS Hkv D]
        return rows.view(*ids.shape[:-1], num_blocks * bs, hkv, d)

    def _decode(self, q, k_cache, v_cache, block_tables, seq_lens, max_len, scale, window, soft_cap):
        # q [S, H, D]; one query per sequence at position seq_len - 1.
        block_size = k_cache.shape[1]
        nb = -(-max_len // block_size)
        k = self._gather(k_cache, block_tables, nb).transpose(1, 2)  # [S, Hkv, L, D]
        v = self._gather(v_cache, block_tables, nb).transpose(1, 2)
        pos = torch.arange(nb * block_size, device=q.device)  # [L]
        mask = pos[None, :] < seq_lens[:, None]  # [S, L]
        if window is not None:
            mask &= pos[None, :] > (seq_lens[:, None] - 1 - window)
        out = self._attend(q.unsqueeze(2), k, v, mask[:, None, None, :], scale, soft_cap)  # [S, H, 1, D]
        return out.squeeze(2)

    def _prefill(self, q, k_cache, v_cache, block_table, ctx_len, scale, window, soft_cap):
        # q [Q, H, D] for positions ctx_len - Q .. ctx_len - 1.
        block_size = k_cache.shape[1]
        nb = -(-ctx_len // block_size)
        k = self._gather(k_cache, block_table, nb)[:ctx_len].transpose(0, 1)  # [Hkv, L, D]
        v = self._gather(v_cache, block_table, nb)[:ctx_len].transpose(0, 1)
        q_len = q.shape[0]
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]  # [Q, 1]
        k_pos = torch.arange(ctx_len, device=q.device)[None, :]  # [1, L]
        mask = k_pos <= q_pos  # [Q, L]
        if window is not None:
            mask &= k_pos > q_pos - window
        out = self._attend(q.transpose(0, 1)[None], k[None], v[None], mask[None, None], scale, soft_cap)
        return out[0].transpose(0, 1)  # [Q, H, D]

    @staticmethod
    def _attend(q, k, v, mask, scale, soft_cap):
        # q [B, H, Q, D], k/v [B, Hkv, L, D], mask [B, 1, Q, L] bool -> [B, H, Q, D]
        group = q.shape[1] // k.shape[1]
        if soft_cap is None:
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                                  scale=scale, enable_gqa=group > 1)
        k = k.repeat_interleave(group, dim=1).to(q.dtype)
        v = v.repeat_interleave(group, dim=1).to(q.dtype)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        scores = soft_cap * torch.tanh(scores / soft_cap)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1).to(v.dtype), v)
