"""HF `architectures` names -> our model classes."""

from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("pagellm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagellm.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("pagellm.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("pagellm.models.qwen3", "Qwen3ForCausalLM"),
    "GemmaForCausalLM": ("pagellm.models.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("pagellm.models.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("pagellm.models.gemma", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("pagellm.models.phi3", "Phi3ForCausalLM"),
    "MixtralForCausalLM": ("pagellm.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("pagellm.models.qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("pagellm.models.qwen_moe", "Qwen3MoeForCausalLM"),
    "GPT2LMHeadModel": ("pagellm.models.gpt2", "GPT2LMHeadModel"),
    "OPTForCausalLM": ("pagellm.models.opt", "OPTForCausalLM"),
    "GPTNeoXForCausalLM": ("pagellm.models.gpt_neox", "GPTNeoXForCausalLM"),
    "FalconForCausalLM": ("pagellm.models.falcon", "FalconForCausalLM"),
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
