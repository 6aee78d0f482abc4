"""Pooling: per-token hidden states -> one float32 vector per prompt (MEAN, CLS or LAST),
optionally L2-normalized. Two batch layouts: padded [B, T, H] with lengths, or flat [N, H]
with cumulative lengths (prompts back to back)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagellm.pooling.config import PoolerConfig


def pool_padded(hidden: torch.Tensor, lengths: torch.Tensor, config: PoolerConfig) -> torch.Tensor:
    """hidden [B, T, H] (row b valid up to lengths[b]), lengths [B] int -> [B, H] float32."""
    # Sums in float32: a bf16 mean over hundreds of tokens loses the low bits that cosine
    # comparisons look at.
    hidden = hidden.float()
    batch = hidden.shape[0]
    if config.pooling_type == "CLS":
        pooled = hidden[:, 0]  # [B, H]
    elif config.pooling_type == "LAST":
        rows = torch.arange(batch, device=hidden.device)
        pooled = hidden[rows, lengths - 1]  # [B, H]
    else:
        positions = torch.arange(hidden.shape[1], device=hidden.device)  # [T]
        valid = (positions[None, :] < lengths[:, None]).unsqueeze(-1)  # [B, T, 1]
        total = (hidden * valid).sum(dim=1)  # [B, H]
        pooled = total / lengths.clamp(min=1).unsqueeze(-1).to(total.dtype)
    return F.normalize(pooled, p=2, dim=-1) if config.normalize else pooled


def pool_flat(hidden: torch.Tensor, cu_seqlens: torch.Tensor, config: PoolerConfig) -> torch.Tensor:
    """hidden [N, H] (prompt b at rows cu_seqlens[b]:cu_seqlens[b+1]), cu_seqlens [B + 1] int
    -> [B, H] float32."""
    hidden = hidden.float()
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]  # [B], [B]
    if config.pooling_type == "CLS":
        pooled = hidden[starts]  # [B, H]
    elif config.pooling_type == "LAST":
        pooled = hidden[ends - 1]  # [B, H]
    else:
        lengths = ends - starts  # [B]
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)  # [N]
        total = torch.zeros(len(lengths), hidden.shape[1], device=hidden.device, dtype=hidden.dtype)
        total.index_add_(0, owner, hidden)  # [B, H]
        pooled = total / lengths.clamp(min=1).unsqueeze(-1).to(total.dtype)
    return F.normalize(pooled, p=2, dim=-1) if config.normalize else pooled
