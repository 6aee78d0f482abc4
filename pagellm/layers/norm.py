"""RMSNorm, with the residual add fused into the same call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.kernels.cpu import rms_norm as cpu_norm


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight. `offset=1.0` gives Gemma's (1 + weight) form.

    After `enable_triton()` 2-D inputs go through one Triton kernel that also does the residual add;
    on the CPU they go through a C kernel that does the same (kernels/cpu/rms_norm.py).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.use_triton = False
        self.eps = eps
        self.offset = offset
        self.shape = (hidden_size,)
        self.weight = nn.Parameter(torch.ones(hidden_size) if offset == 0.0 else torch.zeros(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (fp32 accumulation inside): the step loop is bound by op count on the CPU.
        weight = self.weight + self.offset if self.offset else self.weight
        return F.rms_norm(x, self.shape, weight, self.eps)

    def enable_triton(self) -> None:
        self.use_triton = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., hidden]. With `residual`, returns (norm(x + residual), x + residual)."""
        if self.use_triton and x.dim() == 2:
            from pagellm.kernels.triton.rms_norm import rms_norm
            return rms_norm(x, self.weight, self.eps, self.offset, residual)
        if x.device.type == "cpu" and not self.offset and cpu_norm.supports(x, self.weight, residual):
            return cpu_norm.launch(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual
