"""Mixtral: Mistral whose MLPs are 8 routed SwiGLU experts (top 2, weights renormalised)."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from pagellm.models.moe import MoECausalLM, MoESpec
from pagellm.models.transformer import DecoderSpec

_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_EXPERT = re.compile(r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


class MixtralForCausalLM(MoECausalLM):
    @classmethod
    def spec_from_config(cls, c) -> DecoderSpec:
        return DecoderSpec.from_hf(c, hidden_act=c.hidden_act, sliding_window=getattr(c, "sliding_window", None))

    @classmethod
    def moe_spec_from_config(cls, c) -> MoESpec:
        return MoESpec(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                       intermediate_size=c.intermediate_size, renormalize=True)

    def remap_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        # Mixtral names its MoE block `block_sparse_moe` and its expert matrices w1 (gate), w3 (up), w2 (down).
        for name, tensor in weights:
            match = _MIXTRAL_EXPERT.fullmatch(name)
            if match:
                prefix, expert, w = match.groups()
                name = f"{prefix}.mlp.experts.{expert}.{_EXPERT_NAMES[w]}.weight"
            else:
                name = name.replace(".block_sparse_moe.", ".mlp.")
            yield name, tensor
