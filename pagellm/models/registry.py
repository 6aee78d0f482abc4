"""HF `architectures` names -> our model classes."""

from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("pagellm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagellm.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("pagellm.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("pagellm.models.qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(hf_config) -> tuple[str, type]:
    """(architecture name, class) for the first supported name in `hf_config.architectures`."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in _MODELS:
            module, cls = _MODELS[name]
            return name, getattr(importlib.import_module(module), cls)
    raise ValueError(f"unsupported architecture {names or '(none in config.json)'}; supported architectures: "
                     f"{', '.join(supported_architectures())}")
