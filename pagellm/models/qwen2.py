"""Qwen2: Llama with biases on the q, k and v projections."""

from __future__ import annotations

from pagellm.models.transformer import CausalLM, DecoderSpec


class Qwen2ForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        window = c.sliding_window if getattr(c, "use_sliding_window", False) else None
        return DecoderSpec.from_hf(c, qkv_bias=True, sliding_window=window)
