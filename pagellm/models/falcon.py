"""Falcon: LayerNorm, RoPE, a GELU two-matrix MLP, tied embeddings and a fused qkv projection whose
layout depends on the variant:

- falcon-7b style (multi_query, parallel_attn): one K/V head; attention and MLP read one shared norm.
- falcon-40b/180b style (new_decoder_architecture): grouped K/V heads, each stored after its query
  group, and separate norms for the two parallel branches (ln_attn, ln_mlp).
- otherwise: one K/V head per query head, stored per head as [q, k, v].

ALiBi variants (falcon-rw) are not supported.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from pagellm.models.transformer import CausalLM, DecoderSpec, regroup_qkv, renamed

_P = r"transformer\."
_RULES = [(re.compile(p), r) for p, r in [
    (_P + r"word_embeddings\.(\w+)", r"model.embed_tokens.\1"),
    (_P + r"ln_f\.(\w+)", r"model.norm.\1"),
    (_P + r"h\.(\d+)\.(?:input_layernorm|ln_attn)\.(\w+)", r"model.layers.\1.input_layernorm.\2"),
    (_P + r"h\.(\d+)\.(?:post_attention_layernorm|ln_mlp)\.(\w+)", r"model.layers.\1.post_attention_layernorm.\2"),
    (_P + r"h\.(\d+)\.self_attention\.query_key_value\.(\w+)", r"model.layers.\1.self_attn.qkv_proj.\2"),
    (_P + r"h\.(\d+)\.self_attention\.dense\.(\w+)", r"model.layers.\1.self_attn.o_proj.\2"),
    (_P + r"h\.(\d+)\.mlp\.dense_h_to_4h\.(\w+)", r"model.layers.\1.mlp.up_proj.\2"),
    (_P + r"h\.(\d+)\.mlp\.dense_4h_to_h\.(\w+)", r"model.layers.\1.mlp.down_proj.\2"),
    (r"lm_head\.(\w+)", r"lm_head.\1"),
]]


class FalconForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        if c.alibi:
            raise ValueError("Falcon with alibi=True is not supported (only rotary Falcon models are)")
        new_arch = bool(c.new_decoder_architecture)
        if new_arch and not c.parallel_attn:
            raise ValueError("Falcon with new_decoder_architecture=True and parallel_attn=False is not supported")
        heads = c.num_attention_heads
        kv_heads = c.num_kv_heads if new_arch else (1 if c.multi_query else heads)
        num_ln = c.num_ln_in_parallel_attn or (2 if new_arch else 1)
        return DecoderSpec(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
            num_layers=c.num_hidden_layers, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=c.hidden_size // heads, rms_norm_eps=c.layer_norm_epsilon,
            max_position=c.max_position_embeddings, tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            qkv_bias=bool(c.bias), o_bias=bool(c.bias), mlp_bias=bool(c.bias), norm_type="layer",
            hidden_act=c.activation, gated_mlp=False, parallel_residual=bool(c.parallel_attn),
            shared_input_norm=bool(c.parallel_attn) and num_ln == 1)

    def remap_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        s = self.spec
        # Every layout is [per K/V head: its query group, k, v]; multi_query's [q heads | k | v] is
        # the case of one K/V head.
        for ours, tensor in renamed(weights, _RULES):
            if ".qkv_proj." in ours:
                tensor = regroup_qkv(tensor, s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim)
            yield ours, tensor
