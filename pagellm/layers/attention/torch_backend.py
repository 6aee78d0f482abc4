"""Portable attention in plain PyTorch (CPU and GPU): gathers each sequence's blocks and runs SDPA.
On the CPU, decode tokens go through a C kernel that reads the blocks in place (kernels/cpu).

Everything that depends only on the step (which blocks to gather, the masks) is planned once
per forward pass and shared by every layer: on the CPU the step is bound by the number of ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagellm.kernels.cpu import decode_attention as cpu_decode
from pagellm.layers.attention.backend import AttentionBackend, AttentionMetadata


@dataclass
class _Group:
    """Sequences attended together: rows [lo, hi) of the step's queries."""

    lo: int
    hi: int
    block_ids: torch.Tensor   # [n * nb] int64: the blocks to gather, nb per sequence
    num_blocks: int           # nb
    mask: torch.Tensor        # [n, 1, Q, nb * BS] bool: which keys each query sees
    num_seqs: int             # n (1 for a prefill group, whose Q is its chunk length)
    is_decode: bool


def _plan(meta: AttentionMetadata, block_size: int, window: int | None, decodes: bool = True) -> list[_Group]:
    """Decodes in two length-sorted halves (less padding), then each prefill sequence alone.
    `decodes=False` leaves the decodes out (the CPU kernel attends them)."""
    groups: list[_Group] = []
    nd = meta.num_decodes if decodes else 0
    device = meta.seq_lens.device
    bounds = [0, nd // 2, nd] if nd >= 16 else [0, nd]
    for lo, hi in zip(bounds, bounds[1:]):
        if hi <= lo:
            continue
        nb = -(-max(meta.seq_lens_cpu[lo:hi]) // block_size)
        ids = meta.block_tables[lo:hi, :nb].reshape(-1).long()
        pos = torch.arange(nb * block_size, device=device)  # [L]
        lens = meta.seq_lens[lo:hi, None]  # [n, 1]
        mask = pos[None, :] < lens  # [n, L]; the query sits at position len - 1
        if window is not None:
            mask &= pos[None, :] > lens - 1 - window
        groups.append(_Group(lo, hi, ids, nb, mask[:, None, None, :], hi - lo, True))
    start = meta.num_decode_tokens
    for s in range(meta.num_decodes, len(meta.query_lens_cpu)):
        q_len, ctx = meta.query_lens_cpu[s], meta.seq_lens_cpu[s]
        nb = -(-ctx // block_size)
        ids = meta.block_tables[s, :nb].long()
        q_pos = torch.arange(ctx - q_len, ctx, device=device)[:, None]  # [Q, 1]
        k_pos = torch.arange(nb * block_size, device=device)[None, :]  # [1, L]
        mask = (k_pos <= q_pos) & (k_pos < ctx)  # [Q, L]
        if window is not None:
            mask &= k_pos > q_pos - window
        groups.append(_Group(start, start + q_len, ids, nb, mask[None, None], 1, False))
        start += q_len
    return groups


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        # Gathered K/V blocks land in buffers reused by every layer and step: fresh tens-of-MB
        # tensors would page-fault on each use (on the CPU that was slower than the copy itself).
        self._gather_buffers: dict[str, torch.Tensor] = {}

    def _gather(self, name: str, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """table [num_blocks, W] rows `ids` [N] -> [N, W], in a reused buffer (valid until the next call)."""
        need = ids.numel() * table.shape[1]
        buf = self._gather_buffers.get(name)
        if buf is None or buf.numel() < need or buf.dtype != table.dtype or buf.device != table.device:
            buf = self._gather_buffers[name] = torch.empty(need, dtype=table.dtype, device=table.device)
        return torch.index_select(table, 0, ids, out=buf[:need].view(ids.numel(), table.shape[1]))

    @staticmethod
    def _write(key, value, k_cache, v_cache, meta: AttentionMetadata, plans: dict) -> None:
        """Stores the new tokens' K/V in their slots (padding slots are -1 and skipped)."""
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        if "rows_to_write" not in plans:  # once per step, not per layer: it reads the slots on the host
            slots = meta.slot_mapping
            padded = slots.shape[0] != key.shape[0] or bool((slots < 0).any())
            plans["rows_to_write"] = (slots >= 0).nonzero().squeeze(1) if padded else None
        rows_to_write = plans["rows_to_write"]
        slots = meta.slot_mapping
        if rows_to_write is not None:
            slots, key, value = slots[rows_to_write], key[rows_to_write], value[rows_to_write]
        flat_k.index_copy_(0, slots, key.to(k_cache.dtype))
        flat_v.index_copy_(0, slots, value.to(v_cache.dtype))

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None, logits_soft_cap: float | None = None,
                kv_written: bool = False) -> torch.Tensor:
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        plans = meta.__dict__.setdefault("_torch_plans", {})
        if not kv_written:
            self._write(key, value, k_cache, v_cache, meta, plans)
        outs = []
        nd = meta.num_decodes
        if "cpu_kernel" not in plans:  # the same answer for every layer of the step
            plans["cpu_kernel"] = nd > 0 and cpu_decode.supports(query, k_cache)
        in_place = plans["cpu_kernel"]
        if in_place:
            # The decodes read their blocks in place (C kernel) instead of gather + SDPA.
            outs.append(cpu_decode.paged_decode_attention(
                query[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                sliding_window, logits_soft_cap))
        key = (sliding_window, in_place)
        groups = plans.get(key)
        if groups is None:
            groups = plans[key] = _plan(meta, block_size, sliding_window, decodes=not in_place)
        rows = k_cache.view(num_blocks, block_size * num_kv_heads * head_dim)
        v_rows = v_cache.view(num_blocks, block_size * num_kv_heads * head_dim)
        for g in groups:
            length = g.num_blocks * block_size
            # index_select on whole blocks is a plain row copy, faster than advanced indexing.
            k = self._gather("k", rows, g.block_ids).view(g.num_seqs, length, num_kv_heads, head_dim)
            v = self._gather("v", v_rows, g.block_ids).view(g.num_seqs, length, num_kv_heads, head_dim)
            q = query[g.lo:g.hi]  # [n, H, D] decodes, or [Q, H, D] for one prefill
            q = q.unsqueeze(2) if g.is_decode else q.transpose(0, 1)[None]  # [B, H, Q, D]
            out = self._attend(q, k.transpose(1, 2), v.transpose(1, 2), g.mask, scale, logits_soft_cap)
            outs.append(out.squeeze(2) if g.is_decode else out[0].transpose(0, 1))  # [rows, H, D]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

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
