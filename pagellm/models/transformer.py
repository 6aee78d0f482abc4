"""The decoder-only transformer that Llama-family models share, described by a DecoderSpec.

An architecture file turns its HF config into a spec (what differs: biases, q/k norms, sliding
window...) and inherits everything else from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from pagellm.layers.activation import SiluAndMul
from pagellm.layers.attention.backend import AttentionMetadata
from pagellm.layers.attention.layer import PagedAttention
from pagellm.layers.linear import Linear
from pagellm.layers.norm import RMSNorm
from pagellm.layers.rotary import RotaryEmbedding, rope_inv_freq


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf(cls, c, **overrides) -> DecoderSpec:
        """Reads the fields every Llama-style HF config has."""
        num_heads = c.num_attention_heads
        fields = dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=num_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // num_heads,
            rms_norm_eps=c.rms_norm_eps, max_position=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        )
        fields.update(overrides)
        return cls(**fields)


class DecoderAttention(nn.Module):
    def __init__(self, spec: DecoderSpec, rotary: RotaryEmbedding) -> None:
        super().__init__()
        h, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.qkv_proj = Linear(spec.hidden_size, [h * d, hkv * d, hkv * d], bias=spec.qkv_bias)
        self.o_proj = Linear(h * d, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.rotary = rotary
        self.attn = PagedAttention(h, hkv, d, scale=d ** -0.5, sliding_window=spec.sliding_window)

    def forward(self, cos_sin: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t, h, hkv = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, h + 2 * hkv, self.head_dim)  # [T, H + 2 Hkv, D]
        v = qkv[:, h + hkv:]  # [T, Hkv, D]
        if self.qk_norm:
            q = self.rotary.rotate(self.q_norm(qkv[:, :h]), cos_sin)   # [T, H, D]
            k = self.rotary.rotate(self.k_norm(qkv[:, h:h + hkv]), cos_sin)  # [T, Hkv, D]
        else:
            # q and k rotate together: one set of ops for both.
            qk = self.rotary.rotate(qkv[:, :h + hkv], cos_sin)  # [T, H + Hkv, D]
            q, k = qk[:, :h], qk[:, h:]
        out = self.attn(q, k, v, meta)  # [T, H, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.gate_up_proj = Linear(spec.hidden_size, [spec.intermediate_size] * 2, bias=spec.mlp_bias)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(spec, rotary)
        self.mlp = GatedMLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, cos_sin, x, residual, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(cos_sin, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.rotary = rotary
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, rotary) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        x, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        cos_sin = self.rotary.cos_sin(positions, x.dtype)  # shared by every layer
        for layer in self.layers:
            x, residual = layer(cos_sin, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """A decoder plus its LM head. Subclasses provide `spec_from_config`."""

    # checkpoint name fragment -> (our fused module, shard index)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    @classmethod
    def spec_from_config(cls, hf_config) -> DecoderSpec:
        return DecoderSpec.from_hf(hf_config)

    def __init__(self, hf_config) -> None:
        super().__init__()
        self.spec = spec = self.spec_from_config(hf_config)
        inv_freq, scaling = rope_inv_freq(hf_config, spec.head_dim)
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position, inv_freq, scaling)
        self.model = DecoderModel(spec, rotary)
        self.lm_head = None if spec.tie_word_embeddings else Linear(spec.hidden_size, spec.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab]."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors; returns the names of the parameters that were filled."""
        from pagellm.models.weights import load_named_weights
        return load_named_weights(self, weights, self.packed_modules_mapping)
