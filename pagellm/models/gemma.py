"""Gemma, Gemma 2 and Gemma 3 (text): Llama with (1 + w) RMSNorms, GELU-tanh gates, tied
embeddings scaled by sqrt(hidden) and, from Gemma 2 on, extra norms around attention and MLP.

Gemma 2 adds tanh soft-capping of attention scores and final logits, a query scale of
query_pre_attn_scalar^-1/2 and sliding-window attention on alternate layers. Gemma 3 drops the
attention cap, adds q/k RMSNorms, windows 5 of every 6 layers and gives the windowed layers
their own RoPE (base 10k locally, 1M globally).
"""

from __future__ import annotations

from pagellm.layers.rotary import RotaryEmbedding
from pagellm.models.transformer import CausalLM, DecoderSpec, layer_windows_from_hf


def _gemma_common(c) -> dict:
    return dict(norm_offset=1.0, embed_scale=c.hidden_size ** 0.5,
                qkv_bias=bool(getattr(c, "attention_bias", False)), o_bias=bool(getattr(c, "attention_bias", False)))


class GemmaForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        # Gemma 1 configs name the activation `hidden_act`; HF honours it as written.
        return DecoderSpec.from_hf(c, hidden_act=c.hidden_act, **_gemma_common(c))


class Gemma2ForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        return DecoderSpec.from_hf(
            c, hidden_act=c.hidden_activation, attn_scale=c.query_pre_attn_scalar ** -0.5,
            attn_soft_cap=c.attn_logit_softcapping, final_soft_cap=c.final_logit_softcapping,
            layer_windows=layer_windows_from_hf(c, c.num_hidden_layers), sandwich_norms=True, **_gemma_common(c))


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3 text model (also the text part of a `gemma3_text` checkpoint)."""

    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        return DecoderSpec.from_hf(
            c, hidden_act=c.hidden_activation, attn_scale=c.query_pre_attn_scalar ** -0.5, qk_norm=True,
            attn_soft_cap=c.attn_logit_softcapping, final_soft_cap=c.final_logit_softcapping,
            layer_windows=layer_windows_from_hf(c, c.num_hidden_layers), sandwich_norms=True, **_gemma_common(c))

    def make_rotary(self, hf_config, spec: DecoderSpec):
        # rope_parameters holds one entry per attention type: {"full_attention": ..., "sliding_attention": ...}.
        def rotary(layer_type: str) -> RotaryEmbedding:
            inv_freq, scaling = rope_inv_freq_of_layer_type(hf_config, spec.head_dim, layer_type)
            return RotaryEmbedding(spec.head_dim, spec.max_position, inv_freq, scaling)
        return rotary("full_attention"), rotary("sliding_attention")


def rope_inv_freq_of_layer_type(hf_config, head_dim: int, layer_type: str):
    """(inv_freq, scaling) of a config whose rope_parameters are keyed by attention type."""
    import torch

    params = hf_config.rope_parameters[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, "
                         f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), layer_type=layer_type)
    return inv_freq.float(), float(scaling)
