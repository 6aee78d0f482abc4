"""Linear layers that know how to load HF checkpoint tensors, including fused ones.

A fused layer (q|k|v, gate|up) holds one weight; each checkpoint tensor lands in its shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` > 1 entries make it a fused projection of that many shards."""

    def __init__(self, in_features: int, output_sizes: list[int] | int, bias: bool = False) -> None:
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        out_features = sum(self.output_sizes)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Copies checkpoint `tensor` into shard `shard` of the weight or bias named `name`."""
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a bias for a layer built without one")
        start = sum(self.output_sizes[:shard])
        size = self.output_sizes[shard]
        target = param.data[start:start + size]
        if target.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit {name} shard "
                             f"{shard} of shape {tuple(target.shape)}")
        target.copy_(tensor)
