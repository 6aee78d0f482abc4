"""Rotary position embeddings (RoPE) with the scaling schemes HF configs describe."""

from __future__ import annotations

import torch
from torch import nn


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim / 2], attention scaling) for a HF config.

    The 'default' rope is computed here; scaled variants (llama3, linear, yarn, longrope, ...) use
    transformers' own parameter functions, so configs mean exactly what they mean there.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if rope_type == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, "
                         f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """RoPE in the non-interleaved (GPT-NeoX / HF Llama) layout over the first `rotary_dim` dims.

    `cos_sin(positions, dtype)` is computed once per forward pass and shared by every layer.
    """

    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor, scaling: float = 1.0,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(t.device))  # [P, rotary_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, rotary_dim]
        # [P, 2, rotary_dim] fp32: cos and sin, each over the full rotary width.
        self.register_buffer("cos_sin_cache", torch.stack([emb.cos() * scaling, emb.sin() * scaling], dim=1),
                             persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """positions [T] -> [2, T, 1, rotary_dim] in `dtype` (as HF rotates: in the model's dtype)."""
        return self.cos_sin_cache[positions].to(dtype).transpose(0, 1).unsqueeze(2)

    def rotate(self, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] -> rotated copy."""
        cos, sin = cos_sin[0], cos_sin[1]
        rd = self.rotary_dim
        if rd != x.shape[-1]:
            return torch.cat([self.rotate(x[..., :rd], cos_sin), x[..., rd:]], dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
