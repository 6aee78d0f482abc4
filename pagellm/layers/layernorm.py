"""LayerNorm (mean-centred, with bias), with the same fused-residual call as RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """y = (x - mean) / std * weight + bias, as GPT-2, OPT, GPT-NeoX, Falcon and BERT normalise."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.shape = (hidden_size,)
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., hidden]. With `residual`, returns (norm(x + residual), x + residual)."""
        if residual is None:
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        residual = x + residual
        return F.layer_norm(residual, self.shape, self.weight, self.bias, self.eps), residual
