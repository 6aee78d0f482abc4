"""Qwen3: Llama with per-head RMSNorm on q and k before RoPE (and optional qkv bias)."""

from __future__ import annotations

from pagellm.models.transformer import CausalLM, DecoderSpec


class Qwen3ForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        window = c.sliding_window if getattr(c, "use_sliding_window", False) else None
        return DecoderSpec.from_hf(c, qk_norm=True, qkv_bias=bool(getattr(c, "attention_bias", False)),
                                   sliding_window=window)
