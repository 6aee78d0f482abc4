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
    """Applies RoPE in the non-interleaved (GPT-NeoX / HF Llama) layout to the first `rotary_dim` dims."""

    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor, scaling: float = 1.0,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, rotary_dim / 2]
        # [P, rotary_dim]: cos then sin halves, kept in fp32 for accuracy.
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T], q [T, H, D], k [T, Hkv, D] -> rotated (q, k), same shapes and dtypes."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # [T, rd/2] each
        cos, sin = cos[:, None, :], sin[:, None, :]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rd = self.rotary_dim
        x_rot = x[..., :rd].float()
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        if rd == x.shape[-1]:
            return rotated
        return torch.cat([rotated, x[..., rd:]], dim=-1)
