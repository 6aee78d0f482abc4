"""Qwen2-MoE and Qwen3-MoE: Qwen2 / Qwen3 whose MLPs are routed SwiGLU experts.

Qwen2-MoE adds a shared expert that every token passes through, scaled by a sigmoid gate; both
renormalise the top-k router weights only when `norm_topk_prob` is set, and keep dense MLPs on the
layers listed in `mlp_only_layers` or off the `decoder_sparse_step` grid.
"""

from __future__ import annotations

from pagellm.models.moe import MoECausalLM, MoESpec
from pagellm.models.transformer import DecoderSpec


def _routed(c, **extra) -> MoESpec:
    return MoESpec(num_experts=c.num_experts, top_k=c.num_experts_per_tok, intermediate_size=c.moe_intermediate_size,
                   renormalize=bool(c.norm_topk_prob), sparse_step=getattr(c, "decoder_sparse_step", None) or 1,
                   dense_layers=tuple(getattr(c, "mlp_only_layers", None) or ()), **extra)


def _window(c) -> int | None:
    return c.sliding_window if getattr(c, "use_sliding_window", False) else None


class Qwen2MoeForCausalLM(MoECausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        return DecoderSpec.from_hf(c, hidden_act=c.hidden_act, qkv_bias=bool(getattr(c, "qkv_bias", True)),
                                   sliding_window=_window(c))

    @classmethod
    def moe_spec_from_config(cls, c) -> MoESpec:
        return _routed(c, shared_expert_intermediate_size=c.shared_expert_intermediate_size, shared_expert_gate=True)


class Qwen3MoeForCausalLM(MoECausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        return DecoderSpec.from_hf(c, hidden_act=c.hidden_act, qk_norm=True,
                                   qkv_bias=bool(getattr(c, "attention_bias", False)), sliding_window=_window(c))

    @classmethod
    def moe_spec_from_config(cls, c) -> MoESpec:
        return _routed(c)
