"""GPT-NeoX / Pythia: LayerNorm, partial rotary (rotary_pct of each head), a GELU two-matrix MLP, an
untied output layer and, by default, the parallel residual x + attn(ln1(x)) + mlp(ln2(x)). The fused
qkv rows are stored per head ([q, k, v] for head 0, then head 1...) and regrouped at load."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from pagellm.models.transformer import CausalLM, DecoderSpec, regroup_qkv, renamed, rotary_dim_from_hf

_RULES = [(re.compile(p), r) for p, r in [
    (r"gpt_neox\.embed_in\.(\w+)", r"model.embed_tokens.\1"),
    (r"gpt_neox\.final_layer_norm\.(\w+)", r"model.norm.\1"),
    (r"gpt_neox\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.(\w+)", r"model.layers.\1.\2.\3"),
    (r"gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.(\w+)", r"model.layers.\1.self_attn.qkv_proj.\2"),
    (r"gpt_neox\.layers\.(\d+)\.attention\.dense\.(\w+)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(\w+)", r"model.layers.\1.mlp.up_proj.\2"),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(\w+)", r"model.layers.\1.mlp.down_proj.\2"),
    (r"embed_out\.(\w+)", r"lm_head.\1"),
]]
# Buffers that old checkpoints carry (causal masks, RoPE tables).
_BUFFERS = re.compile(r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)")


class GPTNeoXForCausalLM(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        head_dim = c.hidden_size // c.num_attention_heads
        bias = bool(getattr(c, "attention_bias", True))
        return DecoderSpec(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads,
            head_dim=head_dim, rms_norm_eps=c.layer_norm_eps, max_position=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=bias, o_bias=bias, mlp_bias=True, norm_type="layer", hidden_act=c.hidden_act, gated_mlp=False,
            parallel_residual=bool(c.use_parallel_residual), rotary_dim=rotary_dim_from_hf(c, head_dim))

    def remap_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        s = self.spec
        for ours, tensor in renamed(weights, _RULES, _BUFFERS):
            if ".qkv_proj." in ours:
                tensor = regroup_qkv(tensor, s.num_heads, 1, s.head_dim)
            yield ours, tensor
