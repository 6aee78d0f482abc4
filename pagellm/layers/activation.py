"""Activations by their HF config names, plain and gated."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# HF `hidden_act` / `activation_function` names -> functions. gelu_new, gelu_fast and
# gelu_pytorch_tanh are all the tanh approximation of GELU; "gelu" is the exact erf form.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation a HF config names (e.g. "gelu_new"); ValueError for an unknown name."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


class SiluAndMul(nn.Module):
    """x [..., 2 * d] = [gate | up] -> silu(gate) * up  [..., d]; one Triton kernel after `enable_triton()`."""

    def __init__(self) -> None:
        super().__init__()
        self.use_triton = False

    def enable_triton(self) -> None:
        self.use_triton = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and x.dim() == 2:
            from pagellm.kernels.triton.activation import silu_and_mul
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class ActAndMul(nn.Module):
    """x [..., 2 * d] = [gate | up] -> act(gate) * up  [..., d], for any named activation."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.act = get_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


def gated_activation(name: str) -> nn.Module:
    """act(gate) * up for activation `name`; SiluAndMul for SiLU (the common, cheapest case)."""
    return SiluAndMul() if name in ("silu", "swish") else ActAndMul(name)
