"""Llama (1/2/3, incl. Llama-3 RoPE scaling) and Mistral: the plain decoder with SwiGLU and RMSNorm."""

from __future__ import annotations

from pagellm.models.transformer import CausalLM, DecoderSpec


class LlamaForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        return DecoderSpec.from_hf(c, qkv_bias=bool(getattr(c, "attention_bias", False)),
                                   o_bias=bool(getattr(c, "attention_bias", False)),
                                   mlp_bias=bool(getattr(c, "mlp_bias", False)))


class MistralForCausalLM(CausalLM):
    """Llama with an optional sliding attention window over every layer."""

    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        return DecoderSpec.from_hf(c, sliding_window=getattr(c, "sliding_window", None))
