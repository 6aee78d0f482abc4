"""Builds a model from a ModelSource: the right class, on the device, in the dtype, with weights."""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from pagellm.models.registry import resolve_model_class

logger = logging.getLogger(__name__)


def build_model(source, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """Instantiates the architecture named by the config and fills its weights.

    `load_format == "dummy"` gives random weights of the right shapes (for benchmarks).
    """
    _, cls = resolve_model_class(source.hf_config)
    return instantiate_model(cls, source, dtype, device, lambda model: _init_dummy(model, seed))


def instantiate_model(cls: type[nn.Module], source, dtype: torch.dtype, device: torch.device,
                      init_dummy: Callable[[nn.Module], None], kind: str = "model") -> nn.Module:
    """`cls(source.hf_config)` on `device`, its parameters in `dtype`, filled by `init_dummy` for
    load_format 'dummy' and from `source.iter_weights()` otherwise; in eval mode, its weights
    prepacked when it can. `kind` names it in the log line. Raises ValueError when the
    checkpoint lacks tensors the model has."""
    start = time.perf_counter()
    with torch.device(device):
        model = cls(source.hf_config)
    # Cast parameters only: buffers such as the RoPE table stay in fp32.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    if source.load_format == "dummy":
        init_dummy(model)
    else:
        loaded = model.load_weights(source.iter_weights())
        missing = sorted(set(dict(model.named_parameters())) - loaded)
        if missing:
            raise ValueError(f"weights for {source.path} lack {len(missing)} tensors, e.g. {missing[:3]}")
    model.eval()
    if hasattr(model, "prepack_weights"):
        model.prepack_weights()
    logger.info("%s %s built in %.2f s (%s, %s)", kind, cls.__name__, time.perf_counter() - start, dtype, device)
    return model


@torch.no_grad()
def _init_dummy(model: nn.Module, seed: int) -> None:
    """Random weights (std 0.02), drawn on the model's device so large models start fast."""
    from pagellm.layers.norm import RMSNorm
    norm_weights = {id(m.weight): m.offset for m in model.modules() if isinstance(m, RMSNorm)}
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if id(param) in norm_weights:
            param.fill_(0.0 if norm_weights[id(param)] else 1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
