"""Every architecture against transformers on a tiny random-weight model (fp32, CPU).

For each kind the engine's greedy tokens must equal transformers' `generate` for 32 tokens on
every prompt, and the top-5 logprobs must agree (see helpers.check_logprobs_close).
"""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_KINDS, TINY_PROMPTS, check_logprobs_close, engine_greedy_result, hf_greedy
from pagellm import LLM, SamplingParams

MAX_TOKENS = 32


def _hf_model(folder, **config_overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()


def _ours(folder, prompts, **llm_kwargs):
    llm = LLM(str(folder), dtype="float32", kv_cache_memory="32MiB", **llm_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.llm_engine.kv_cache.num_used_blocks == 0
    return [engine_greedy_result(o) for o in outputs]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_greedy_and_logprobs_match_transformers(kind: str, tiny_model_dirs) -> None:
    folder = tiny_model_dirs(kind)
    theirs = hf_greedy(_hf_model(folder), TINY_PROMPTS, MAX_TOKENS)
    # block_size 8 and a small token budget: prompts span several blocks and prefill is chunked.
    ours = _ours(folder, TINY_PROMPTS, block_size=8, max_num_batched_tokens=24)
    assert all(len(r.token_ids) == MAX_TOKENS for r in ours)
    assert all(len(r.top_logprobs) == MAX_TOKENS for r in ours)
    assert all(5 <= len(top) <= 6 for r in ours for top in r.top_logprobs)
    # The models are peaked enough that fp32 rounding never flips a choice: demand equality.
    check_logprobs_close(ours, theirs, atol=1e-3, require_equal=True)
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]


def test_mistral_window_matters(tiny_model_dirs) -> None:
    """The window of 8 changes the outputs, so the comparison above really checks it."""
    folder = tiny_model_dirs("mistral")
    windowed = hf_greedy(_hf_model(folder), TINY_PROMPTS[3:4], MAX_TOKENS, num_logprobs=1)
    full = hf_greedy(_hf_model(folder, sliding_window=None), TINY_PROMPTS[3:4], MAX_TOKENS, num_logprobs=1)
    assert windowed[0].token_ids != full[0].token_ids


def test_llama3_rope_scaling_matters(tiny_model_dirs) -> None:
    """Llama-3 scaling changes the outputs compared with plain RoPE of the same theta."""
    folder = tiny_model_dirs("llama3")
    scaled = hf_greedy(_hf_model(folder), TINY_PROMPTS[3:4], MAX_TOKENS, num_logprobs=1)
    plain = hf_greedy(_hf_model(folder, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
                      TINY_PROMPTS[3:4], MAX_TOKENS, num_logprobs=1)
    assert scaled[0].token_ids != plain[0].token_ids


def test_check_logprobs_close_catches_wrong_tokens() -> None:
    """The comparison helper itself fails on a real mismatch and tolerates a near tie."""
    from helpers import GreedyResult

    ref = [GreedyResult([1, 2], [{1: -0.1, 5: -3.0}, {2: -0.69, 6: -0.70}])]
    wrong = [GreedyResult([7, 2], [{7: -0.1, 8: -3.0}, {2: -0.69, 6: -0.70}])]
    tie = [GreedyResult([1, 6], [{1: -0.1, 5: -3.0}, {6: -0.69, 2: -0.70}])]
    off = [GreedyResult([1, 2], [{1: -0.5, 5: -3.0}, {2: -0.69, 6: -0.70}])]
    with pytest.raises(AssertionError):
        check_logprobs_close(wrong, ref)
    with pytest.raises(AssertionError):
        check_logprobs_close(off, ref)
    with pytest.raises(AssertionError):
        check_logprobs_close(tie, ref, atol=0.05, require_equal=True)
    assert check_logprobs_close(tie, ref, atol=0.05) == 1
    assert check_logprobs_close(ref, ref) == 0
