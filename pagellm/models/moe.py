"""The sparse mixture-of-experts decoder: the dense decoder whose MLPs (all, or some) are routed
experts. Mixtral, Qwen2-MoE and Qwen3-MoE differ only in the options of `MoESpec`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from pagellm.layers.moe import FusedMoE, SparseMoeBlock
from pagellm.models.transformer import CausalLM, DecoderSpec, GatedMLP

# "model.layers.3.mlp.experts.7.up_proj.weight" -> ("model.layers.3.mlp.experts", 7, "up_proj")
_EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int  # of each routed expert
    renormalize: bool  # rescale the top-k router weights to sum to one
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False
    sparse_step: int = 1  # layer i is sparse when (i + 1) % sparse_step == 0 ...
    dense_layers: tuple[int, ...] = ()  # ... and it is not listed here

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1; got {self.num_experts}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}]; got {self.top_k}")
        if self.sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1; got {self.sparse_step}")

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0


class MoECausalLM(CausalLM):
    """Subclasses provide `spec_from_config` and `moe_spec_from_config`."""

    @classmethod
    def moe_spec_from_config(cls, hf_config) -> MoESpec:
        raise NotImplementedError

    def make_mlp(self, hf_config, spec: DecoderSpec, layer: int) -> nn.Module:
        moe = self.moe_spec_from_config(hf_config)
        if not moe.is_sparse(layer):
            return GatedMLP(spec)
        experts = FusedMoE(moe.num_experts, moe.top_k, spec.hidden_size, moe.intermediate_size,
                           moe.renormalize, spec.hidden_act)
        shared = GatedMLP(spec, moe.shared_expert_intermediate_size) if moe.shared_expert_intermediate_size else None
        return SparseMoeBlock(spec.hidden_size, experts, shared, moe.shared_expert_gate)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Per-expert tensors go into the stacked expert weights; everything else loads as usual."""
        loaded: set[str] = set()
        rest = self._load_experts(self.remap_weights(weights), loaded)
        from pagellm.models.weights import load_named_weights
        return load_named_weights(self, rest, self.packed_modules_mapping) | loaded

    def _load_experts(self, weights: Iterable[tuple[str, torch.Tensor]], loaded: set[str]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
        modules = dict(self.named_modules())
        for name, tensor in weights:
            match = _EXPERT_TENSOR.fullmatch(name)
            if match is None:
                yield name, tensor
                continue
            module = modules.get(match.group(1))
            if not isinstance(module, FusedMoE):
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            param = module.load_expert(int(match.group(2)), match.group(3), tensor)
            loaded.add(f"{match.group(1)}.{param}")
