"""The default model, SmolLM2-135M-Instruct (real weights, fp32), against transformers.

transformers reads the same GGUF file (dequantized to fp32) and is the reference: greedy text
must be equal for plain prompts and for a chat prompt. MODELS.md's recorded outputs are
checked too, so a shared mistake (e.g. in the tokenizer both sides use) still shows.
"""

from __future__ import annotations

import pytest
import torch

from helpers import requires_default_model
from pagellm import SamplingParams

pytestmark = [requires_default_model, pytest.mark.slow]

MAX_TOKENS = 20
PROMPTS = ["The capital of France is", "Hello, my name is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# Recorded with transformers fp32 on the dequantized GGUF (see ../shared/MODELS.md).
EXPECTED = {
    "The capital of France is": " Paris.\n\nThe answer is: 2018-01-22 ",
    "chat": "The capital of France is Paris.",
}


@pytest.fixture(scope="module")
def hf_smollm2():
    """transformers' own fp32 model from the GGUF file (slow: it parses the file twice)."""
    from transformers import AutoModelForCausalLM

    from pagellm.models.loader import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _hf_generate(model, prompt_ids: list[int], eos_ids: set[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])  # [1, P]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
                         eos_token_id=sorted(eos_ids), pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_text_equals_transformers(smollm2_llm, hf_smollm2) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = smollm2_llm.generate(PROMPTS, params, use_tqdm=False)
    tokenizer = smollm2_llm.get_tokenizer()
    eos = smollm2_llm.llm_engine.eos_token_ids
    for prompt, out in zip(PROMPTS, outputs):
        assert out.prompt == prompt
        assert out.prompt_token_ids == tokenizer.encode(prompt)
        ref = _hf_generate(hf_smollm2, out.prompt_token_ids, eos)
        ours = out.outputs[0].token_ids
        # Both stop at EOS, which ours keeps in token_ids and transformers keeps too.
        assert ours == ref, f"{prompt!r}: {tokenizer.decode(ours)!r} vs {tokenizer.decode(ref)!r}"
        assert out.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)
    assert outputs[0].outputs[0].text == EXPECTED["The capital of France is"]
    assert outputs[0].outputs[0].finish_reason == "length"


def test_chat_equals_transformers(smollm2_llm, hf_smollm2) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    out = smollm2_llm.chat(CHAT, params, use_tqdm=False)[0]
    tokenizer = smollm2_llm.get_tokenizer()
    expected_prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert out.prompt == expected_prompt
    assert out.prompt.endswith("<|im_start|>assistant\n")
    ref = _hf_generate(hf_smollm2, out.prompt_token_ids, smollm2_llm.llm_engine.eos_token_ids)
    assert out.outputs[0].token_ids == ref
    assert out.outputs[0].text == EXPECTED["chat"]
    # The answer is short: it ends on <|im_end|>, which is not shown in the text.
    assert out.outputs[0].finish_reason == "stop"
    assert tokenizer.convert_ids_to_tokens(out.outputs[0].token_ids[-1]) == "<|im_end|>"


def test_default_sampling_runs_and_is_seeded(smollm2_llm) -> None:
    """The issue's quick-start call: sampled text is produced and a seed makes it repeatable."""
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=1234)
    first = smollm2_llm.generate(["The capital of France is", "Hello, my name is"], params, use_tqdm=False)
    again = smollm2_llm.generate(["Hello, my name is"], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) >= 1 and o.outputs[0].text for o in first)
    assert again[0].outputs[0].token_ids == first[1].outputs[0].token_ids
    assert smollm2_llm.llm_engine.kv_cache.num_used_blocks == 0
