"""RMSNorm, with the residual add fused into the same call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight. `offset=1.0` gives Gemma's (1 + weight) form."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.shape = (hidden_size,)
        self.weight = nn.Parameter(torch.ones(hidden_size) if offset == 0.0 else torch.zeros(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (fp32 accumulation inside): the step loop is bound by op count on the CPU.
        weight = self.weight + self.offset if self.offset else self.weight
        return F.rms_norm(x, self.shape, weight, self.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., hidden]. With `residual`, returns (norm(x + residual), x + residual)."""
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual
