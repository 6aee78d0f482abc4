"""Copies HF-named checkpoint tensors into a model's (possibly fused) parameters."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagellm.layers.linear import Linear

# Checkpoint entries that hold no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       packed: dict[str, tuple[str, int]]) -> set[str]:
    """Fills `model` from (name, tensor) pairs. `packed` maps a checkpoint module name to the fused
    module and shard it belongs to (e.g. "q_proj" -> ("qkv_proj", 0)). Returns loaded parameter names."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tied = getattr(getattr(model, "spec", None), "tie_word_embeddings", False)
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name.startswith("lm_head.")):
            continue
        module_path, _, leaf = name.rpartition(".")
        parent, _, child = module_path.rpartition(".")
        # A linear layer holds a weight and a bias only: anything else (a quantization scale, say)
        # would otherwise land in its bias.
        on_linear = child in packed or isinstance(modules.get(module_path), Linear)
        if on_linear and leaf not in ("weight", "bias"):
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
        if child in packed:
            fused, shard = packed[child]
            target = f"{parent}.{fused}" if parent else fused
            module = modules.get(target)
            if not isinstance(module, Linear):
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            module.load_shard(leaf, tensor, shard)
            loaded.add(f"{target}.{leaf}")
            continue
        module = modules.get(module_path)
        if isinstance(module, Linear) and len(module.output_sizes) == 1:
            module.load_shard(leaf, tensor, 0)
            loaded.add(name)
            continue
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
        if param.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(param.shape)}")
        param.data.copy_(tensor)
        loaded.add(name)
    return loaded
