"""OPT: learned positions offset by 2, pre-LayerNorm blocks with biases, a ReLU two-matrix MLP and
tied embeddings. The post-norm variant (opt-350m: do_layer_norm_before=False, with its embedding
projections) is not supported."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from pagellm.models.transformer import CausalLM, DecoderSpec, renamed

_P = r"(?:model\.)?decoder\."
_RULES = [(re.compile(p), r) for p, r in [
    (_P + r"embed_tokens\.(\w+)", r"model.embed_tokens.\1"),
    (_P + r"embed_positions\.(\w+)", r"model.embed_positions.\1"),
    (_P + r"final_layer_norm\.(\w+)", r"model.norm.\1"),
    (_P + r"layers\.(\d+)\.self_attn\.out_proj\.(\w+)", r"model.layers.\1.self_attn.o_proj.\2"),
    (_P + r"layers\.(\d+)\.self_attn\.([qkv]_proj)\.(\w+)", r"model.layers.\1.self_attn.\2.\3"),
    (_P + r"layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"model.layers.\1.input_layernorm.\2"),
    (_P + r"layers\.(\d+)\.final_layer_norm\.(\w+)", r"model.layers.\1.post_attention_layernorm.\2"),
    (_P + r"layers\.(\d+)\.fc1\.(\w+)", r"model.layers.\1.mlp.up_proj.\2"),
    (_P + r"layers\.(\d+)\.fc2\.(\w+)", r"model.layers.\1.mlp.down_proj.\2"),
    (r"lm_head\.(\w+)", r"lm_head.\1"),
]]


class OPTForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        if not c.do_layer_norm_before:
            raise ValueError("OPT with do_layer_norm_before=False (post-norm, e.g. opt-350m) is not supported")
        if c.word_embed_proj_dim != c.hidden_size:
            raise ValueError(f"OPT with word_embed_proj_dim ({c.word_embed_proj_dim}) != hidden_size "
                             f"({c.hidden_size}) is not supported")
        if not getattr(c, "layer_norm_elementwise_affine", True):
            raise ValueError("OPT with layer_norm_elementwise_affine=False is not supported")
        bias = bool(getattr(c, "enable_bias", True))
        return DecoderSpec(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_dim,
            num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads,
            head_dim=c.hidden_size // c.num_attention_heads, rms_norm_eps=1e-5,
            max_position=c.max_position_embeddings, tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            qkv_bias=bias, o_bias=bias, mlp_bias=bias, norm_type="layer", hidden_act=c.activation_function,
            gated_mlp=False, position_embedding="learned", position_offset=2,
            final_norm=not getattr(c, "_remove_final_layer_norm", False))

    def remap_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return renamed(weights, _RULES)
