"""Linear layers that know how to load HF checkpoint tensors, including fused ones.

A fused layer (q|k|v, gate|up) holds one weight; each checkpoint tensor lands in its shard.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def cpu_prepacked_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked layout of a bf16 CPU weight, or None where that does not apply.

    F.linear re-lays the weight out on every call; a pre-packed weight skips that (about a third
    of the time of a decode step's GEMMs on SmolLM2 at batch 64).
    """
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    if os.environ.get("PAGELLM_CPU_PREPACK", "1") == "0":
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
    except (RuntimeError, AttributeError):  # an op missing from this build: stay on F.linear
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] @ packed weight -> [N, out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  gated: bool = False, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight^T (+ bias) through the Triton decode-batch kernel (into `out` when given), or None
    where it does not apply (too many rows, or a shape cuBLAS serves better). With `gated`, x is
    [gate | up] and the product reads silu(gate) * up."""
    from pagellm.kernels.triton.skinny_gemm import select_config, skinny_gemm
    if x.dim() != 2 or x.stride(-1) != 1:
        return None
    config = select_config(x.shape[0], weight.shape[0], weight.shape[1], x.device, gated=gated)
    if config is None:
        return None
    return skinny_gemm(x, weight, bias, config=config, gated=gated, out=out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, use_triton: bool = False,
           packed: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T (+ bias): the skinny Triton kernel for decode-sized batches
    (`use_triton`), oneDNN's packed weight on the CPU (`packed`), else cuBLAS / PyTorch. Written into
    `out` ([T, out], e.g. a CUDA graph's static output) when given."""
    if use_triton:
        y = skinny_linear(x, weight, bias, out=out)
        if y is not None:
            return y
    if packed is not None and x.dim() == 2:
        y = packed_linear(x, packed, bias)
        return y if out is None else out.copy_(y)
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` > 1 entries make it a fused projection of that many shards."""

    def __init__(self, in_features: int, output_sizes: list[int] | int, bias: bool = False) -> None:
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        out_features = sum(self.output_sizes)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.packed: torch.Tensor | None = None  # set by prepack(), after the weights are loaded
        self.use_triton = False  # set by enable_triton(): decode-sized batches use the skinny kernel

    def prepack(self) -> None:
        self.packed = cpu_prepacked_weight(self.weight)

    def enable_triton(self) -> None:
        self.use_triton = True

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out_features]; written into `out` when given (2-D x)."""
        return linear(x, self.weight, self.bias, use_triton=self.use_triton, packed=self.packed, out=out)

    def forward_silu_gated(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """This layer applied to silu(gate) * up of gate_up [T, 2 * in], in one kernel; None where
        the skinny kernel does not take the shape (the caller then runs the two steps)."""
        if not self.use_triton:
            return None
        return skinny_linear(gate_up, self.weight, self.bias, gated=True)

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
