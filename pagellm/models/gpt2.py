"""GPT-2: learned absolute positions, LayerNorm, a GELU (tanh) two-matrix MLP, biases everywhere and
tied embeddings. Its checkpoints store Conv1D weights as [in, out]: they are transposed at load."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from pagellm.models.transformer import CausalLM, DecoderSpec, renamed

# The hub's original GPT-2 files lack the "transformer." prefix that transformers writes.
_P = r"(?:transformer\.)?"
_RULES = [(re.compile(p), r) for p, r in [
    (_P + r"wte\.(\w+)", r"model.embed_tokens.\1"),
    (_P + r"wpe\.(\w+)", r"model.embed_positions.\1"),
    (_P + r"ln_f\.(\w+)", r"model.norm.\1"),
    (_P + r"h\.(\d+)\.ln_1\.(\w+)", r"model.layers.\1.input_layernorm.\2"),
    (_P + r"h\.(\d+)\.ln_2\.(\w+)", r"model.layers.\1.post_attention_layernorm.\2"),
    (_P + r"h\.(\d+)\.attn\.c_attn\.(\w+)", r"model.layers.\1.self_attn.qkv_proj.\2"),
    (_P + r"h\.(\d+)\.attn\.c_proj\.(\w+)", r"model.layers.\1.self_attn.o_proj.\2"),
    (_P + r"h\.(\d+)\.mlp\.c_fc\.(\w+)", r"model.layers.\1.mlp.up_proj.\2"),
    (_P + r"h\.(\d+)\.mlp\.c_proj\.(\w+)", r"model.layers.\1.mlp.down_proj.\2"),
    (r"lm_head\.(\w+)", r"lm_head.\1"),
]]
# Causal-mask buffers that old checkpoints carry.
_BUFFERS = re.compile(_P + r"h\.\d+\.attn\.(bias|masked_bias)")


class GPT2LMHeadModel(CausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        if getattr(c, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported")
        heads = c.n_head
        return DecoderSpec(
            vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_inner or 4 * c.n_embd,
            num_layers=c.n_layer, num_heads=heads, num_kv_heads=heads, head_dim=c.n_embd // heads,
            rms_norm_eps=c.layer_norm_epsilon, max_position=c.n_positions,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            qkv_bias=True, o_bias=True, mlp_bias=True, norm_type="layer", hidden_act=c.activation_function,
            gated_mlp=False, position_embedding="learned",
            attn_scale=None if getattr(c, "scale_attn_weights", True) else 1.0)

    def remap_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for ours, tensor in renamed(weights, _RULES, _BUFFERS):
            if ours.endswith(("qkv_proj.weight", "o_proj.weight", "up_proj.weight", "down_proj.weight")):
                tensor = tensor.t()  # Conv1D [in, out] -> Linear [out, in]
            yield ours, tensor
