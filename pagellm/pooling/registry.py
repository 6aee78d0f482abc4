"""Encoder (embedding) architectures, kept apart from the decoder registry: a name here is
served by the EmbeddingEngine, never by the LLMEngine's scheduler and KV cache."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from pagellm.models.builder import instantiate_model

_POOLING_MODELS = {
    "BertModel": ("pagellm.models.bert", "BertModel"),
    # Checkpoints saved with a task head still hold the whole encoder under "bert.".
    "BertForMaskedLM": ("pagellm.models.bert", "BertModel"),
    "BertForPreTraining": ("pagellm.models.bert", "BertModel"),
}
# A config.json without `architectures` is placed by its model_type.
_BY_MODEL_TYPE = {"bert": "BertModel"}


def supported_pooling_architectures() -> list[str]:
    return sorted(_POOLING_MODELS)


def pooling_architecture(architectures: list[str] | None, model_type: str | None) -> str | None:
    """The first supported encoder name among `architectures` (or the one `model_type` implies
    when there are none); None when the model is not one of ours."""
    names = list(architectures or [])
    if not names and model_type in _BY_MODEL_TYPE:
        names = [_BY_MODEL_TYPE[model_type]]
    return next((name for name in names if name in _POOLING_MODELS), None)


def resolve_pooling_model_class(hf_config, model: str) -> tuple[str, type[nn.Module]]:
    """(architecture name, class) of an encoder config; ValueError (mentioning task='generate')
    for anything else, such as a decoder checkpoint."""
    names = list(getattr(hf_config, "architectures", None) or [])
    name = pooling_architecture(names, getattr(hf_config, "model_type", None))
    if name is None:
        raise ValueError(f"task='embed' needs an embedding (encoder) model; model {model!r} is "
                         f"{names or getattr(hf_config, 'model_type', 'unknown')}. Supported embedding "
                         f"architectures: {', '.join(supported_pooling_architectures())}; load decoder models "
                         f"with task='generate'")
    module, cls = _POOLING_MODELS[name]
    return name, getattr(importlib.import_module(module), cls)


def check_generate_model(model: str | None) -> None:
    """Raises ValueError when `model` is a folder whose config.json names an embedding model,
    so that task='generate' on it says what to do instead of 'unsupported architecture'.
    Reads only config.json; anything else (GGUF, default model, unreadable) passes through."""
    if model is None:
        return
    config_file = Path(model).expanduser() / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # the engine's own loader reports it properly
    if not isinstance(config, dict):
        return
    architectures = config.get("architectures")
    name = pooling_architecture(architectures if isinstance(architectures, list) else None, config.get("model_type"))
    if name is not None:
        raise ValueError(f"task='generate' needs a text-generation model, but model {model!r} is an embedding "
                         f"model ({name}); load it with task='embed' (or runner='pooling'; on the command "
                         f"line, --task embed)")


def build_pooling_model(cls: type[nn.Module], source, dtype: torch.dtype, device: torch.device,
                        seed: int = 0) -> nn.Module:
    """The encoder on `device` in `dtype` with the source's weights (random ones for load_format
    'dummy'). Raises ValueError when the checkpoint lacks or misplaces tensors."""
    if source.load_format not in ("dummy", "safetensors"):
        raise ValueError(f"embedding models load from safetensors folders; got load_format={source.load_format!r}")
    return instantiate_model(cls, source, dtype, device, lambda model: _init_dummy(model, seed), kind="encoder")


@torch.no_grad()
def _init_dummy(model: nn.Module, seed: int) -> None:
    """Random weights (std 0.02) with unit norms, for benchmarks without a checkpoint."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
