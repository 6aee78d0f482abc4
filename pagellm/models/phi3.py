"""Phi-3: Llama whose checkpoint already fuses q|k|v and gate|up, with optional partial rotary and
LongRoPE scaling.

LongRoPE has two sets of frequency factors: HF uses the short ones while a sequence fits in
`original_max_position_embeddings` and, once it grows past that, recomputes the whole sequence with
the long ones. A paged KV cache cannot re-rotate keys already stored, so here the choice is made per
position: positions below the original limit rotate with the short factors, later ones with the long
factors. That equals HF for every sequence within the original limit (prompt and output together);
past it, earlier keys keep their short-factor rotation where HF would have recomputed them.
"""

from __future__ import annotations

import torch

from pagellm.layers.rotary import RotaryEmbedding
from pagellm.models.transformer import CausalLM, DecoderSpec, rotary_dim_from_hf


class Phi3ForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return DecoderSpec.from_hf(c, hidden_act=c.hidden_act, sliding_window=getattr(c, "sliding_window", None),
                                   rotary_dim=rotary_dim_from_hf(c, head_dim))

    def make_rotary(self, hf_config, spec: DecoderSpec):
        rotary, _ = super().make_rotary(hf_config, spec)
        params = getattr(hf_config, "rope_parameters", None) or {}
        if params.get("rope_type") != "longrope":
            return rotary, None
        original = params.get("original_max_position_embeddings") or hf_config.original_max_position_embeddings
        if spec.max_position > original:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            long_inv_freq, scaling = ROPE_INIT_FUNCTIONS["longrope"](hf_config, torch.device("cpu"),
                                                                     seq_len=original + 1)
            long = RotaryEmbedding(spec.head_dim, spec.max_position, long_inv_freq.float(), float(scaling),
                                   rotary_dim=rotary.rotary_dim)
            rotary.cos_sin_cache[original:] = long.cos_sin_cache[original:]  # [P - original, 2, rotary_dim]
        return rotary, None
