"""The offline API on a tiny model: prompt forms, outputs, finish reasons, stop conditions,
logprobs, prompt logprobs, n > 1, chat, defaults and metrics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pagellm import LLM, CompletionOutput, RequestOutput, SamplingParams

EOS = 2  # <|im_end|> in the SmolLM2 vocabulary, and eos_token_id of the tiny models
PROMPT = {"prompt_token_ids": [504, 3575, 282, 4649, 314, 9906, 28]}


def greedy(max_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=kwargs.pop("ignore_eos", True), **kwargs)


def one(llm: LLM, prompt, params: SamplingParams) -> CompletionOutput:
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


@pytest.fixture(scope="module")
def reference(tiny_llm) -> CompletionOutput:
    """24 greedy tokens of PROMPT, to derive stop conditions from."""
    return one(tiny_llm, PROMPT, greedy(24))


# ---- prompts and outputs ------------------------------------------------------------------------------
def test_prompt_forms_and_output_order(tiny_llm) -> None:
    tokenizer = tiny_llm.get_tokenizer()
    text = "The capital of France is"
    ids = tokenizer.encode(text)
    outs = tiny_llm.generate([text, {"prompt_token_ids": ids}, ids[:3], {"prompt": text}], greedy(5), use_tqdm=False)
    assert [type(o) for o in outs] == [RequestOutput] * 4
    assert len({o.request_id for o in outs}) == 4
    assert outs[0].prompt == text and outs[0].prompt_token_ids == ids
    assert outs[1].prompt is None and outs[1].prompt_token_ids == ids
    assert outs[2].prompt_token_ids == ids[:3]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[3].outputs[0].token_ids
    # A flat list of ints is one tokenized prompt.
    flat = tiny_llm.generate(ids, greedy(5), use_tqdm=False)
    assert len(flat) == 1 and flat[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    for o in outs:
        assert o.finished and len(o.outputs) == 1
        c = o.outputs[0]
        assert c.index == 0 and c.finish_reason == "length" and c.finished()
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.logprobs is None and c.cumulative_logprob is None and o.prompt_logprobs is None


def test_one_sampling_params_per_prompt(tiny_llm) -> None:
    outs = tiny_llm.generate([PROMPT] * 3, [greedy(2), greedy(5), greedy(1)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5, 1]


def test_metrics_times_are_ordered(tiny_llm) -> None:
    out = tiny_llm.generate(PROMPT, greedy(4), use_tqdm=True)[0]
    m = out.metrics
    assert m is not None
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time


def test_default_params_come_from_generation_config(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = tmp_path / "with_defaults"
    shutil.copytree(tiny_llama_dir, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update({"temperature": 0.0, "max_new_tokens": 3})
    (folder / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(folder), dtype="float32", kv_cache_memory="16MiB")
    params = llm.get_default_sampling_params()
    assert params.temperature == 0.0 and params.max_tokens == 3
    assert len(one(llm, PROMPT, None).token_ids) == 3
    # generation_config="pagellm" ignores the model's file: vLLM's defaults (16 tokens, T=1).
    plain = LLM(str(folder), dtype="float32", kv_cache_memory="16MiB", generation_config="pagellm")
    assert plain.get_default_sampling_params().max_tokens == 16
    assert plain.get_default_sampling_params().temperature == 1.0


# ---- finish reasons and stop conditions --------------------------------------------------------------
def test_eos_stops_unless_ignored(tiny_llm) -> None:
    force_eos = {EOS: 100.0}
    c = one(tiny_llm, PROMPT, greedy(8, ignore_eos=False, logit_bias=force_eos))
    assert c.token_ids == [EOS] and c.finish_reason == "stop" and c.stop_reason is None
    assert c.text == ""  # special tokens are skipped
    c = one(tiny_llm, PROMPT, greedy(3, ignore_eos=True, logit_bias=force_eos))
    assert c.token_ids == [EOS] * 3 and c.finish_reason == "length"
    c = one(tiny_llm, PROMPT, greedy(3, ignore_eos=False, logit_bias=force_eos, skip_special_tokens=False))
    assert c.text == "<|im_end|>"


def test_min_tokens_holds_back_eos(tiny_llm) -> None:
    c = one(tiny_llm, PROMPT, greedy(10, ignore_eos=False, logit_bias={EOS: 100.0}, min_tokens=4))
    assert len(c.token_ids) == 5 and EOS not in c.token_ids[:4] and c.token_ids[4] == EOS
    assert c.finish_reason == "stop"


def test_stop_token_ids(tiny_llm, reference) -> None:
    stop_token = reference.token_ids[5]
    first = reference.token_ids.index(stop_token)
    c = one(tiny_llm, PROMPT, greedy(24, stop_token_ids=[stop_token]))
    assert c.token_ids == reference.token_ids[:first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop_token
    # min_tokens: the stop token cannot end the request before min_tokens tokens.
    c = one(tiny_llm, PROMPT, greedy(24, stop_token_ids=[stop_token], min_tokens=first + 3))
    assert len(c.token_ids) >= first + 3
    assert c.finish_reason == "length" or c.token_ids[-1] == stop_token


def test_stop_strings(tiny_llm, reference) -> None:
    tokenizer = tiny_llm.get_tokenizer()
    text = reference.text
    assert text == tokenizer.decode(reference.token_ids, skip_special_tokens=True)
    # A stop string from the middle of the text, spanning (probably) a token boundary.
    start = next(i for i in range(len(text) // 2, len(text) - 4) if "\ufffd" not in text[i:i + 4])
    stop = text[start:start + 4]
    cut = text.find(stop)
    c = one(tiny_llm, PROMPT, greedy(24, stop=[stop, "string that never occurs"]))
    assert c.text == text[:cut]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    # Generation stopped at the token that completed the stop string, not later.
    assert c.token_ids == reference.token_ids[:len(c.token_ids)]
    assert stop in tokenizer.decode(c.token_ids) and stop not in tokenizer.decode(c.token_ids[:-1])
    kept = one(tiny_llm, PROMPT, greedy(24, stop=stop, include_stop_str_in_output=True))
    assert kept.text == text[:cut + len(stop)] and kept.token_ids == c.token_ids


def test_length_finish_flushes_unfinished_character(tiny_llm) -> None:
    """A request that ends in the middle of a UTF-8 character shows it as U+FFFD, as decode does."""
    tokenizer = tiny_llm.get_tokenizer()
    lead_byte = tokenizer.convert_tokens_to_ids("Ã")  # byte 0xC3: the start of a 2-byte character
    c = one(tiny_llm, PROMPT, greedy(2, logit_bias={lead_byte: 100.0}))
    assert c.token_ids == [lead_byte, lead_byte]
    assert c.text == tokenizer.decode(c.token_ids) == "\ufffd\ufffd"


# ---- logprobs ---------------------------------------------------------------------------------------
def test_sample_logprobs(tiny_llm, reference) -> None:
    c = one(tiny_llm, PROMPT, greedy(6, logprobs=3))
    assert c.token_ids == reference.token_ids[:6]
    assert len(c.logprobs) == 6
    total = 0.0
    for token, position in zip(c.token_ids, c.logprobs):
        assert token in position
        chosen = position[token]
        assert chosen.rank == 1 and chosen.logprob <= 0.0  # greedy takes the most likely token
        assert len(position) == 3
        ranked = sorted(position.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:]))
        assert all(lp.decoded_token is not None for lp in ranked)
        total += chosen.logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
    # logprobs=0: only the sampled token.
    c0 = one(tiny_llm, PROMPT, greedy(3, logprobs=0))
    assert all(list(position) == [t] for t, position in zip(c0.token_ids, c0.logprobs))


def test_sampled_token_outside_top_k_is_reported_with_its_rank(tiny_llm) -> None:
    # A strongly biased token is sampled; logprobs report the raw model's distribution.
    c = one(tiny_llm, PROMPT, SamplingParams(temperature=1.0, max_tokens=2, logprobs=2, logit_bias={777: 100.0},
                                             seed=3, ignore_eos=True))
    assert c.token_ids == [777, 777]
    for position in c.logprobs:
        assert 777 in position and len(position) == 3
        assert position[777].rank > 2


@pytest.fixture(scope="module")
def hf_tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("chunked", [False, True])
def test_prompt_logprobs_match_transformers(tiny_llm, tiny_llama_dir, hf_tiny_llama, chunked: bool) -> None:
    prompt_ids = [(31 * i + 7) % 49152 for i in range(40)]
    llm = tiny_llm
    if chunked:  # the prompt is scored over several prefill chunks
        llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="16MiB", max_num_batched_tokens=16)
    out = llm.generate({"prompt_token_ids": prompt_ids}, greedy(2, prompt_logprobs=2), use_tqdm=False)[0]
    with torch.no_grad():
        logits = hf_tiny_llama(torch.tensor([prompt_ids])).logits[0]  # [P, V]
    ref = torch.log_softmax(logits.float(), dim=-1)
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt_ids) and lps[0] is None
    for i in range(1, len(prompt_ids)):
        token = prompt_ids[i]
        entry = lps[i]
        assert token in entry
        assert math.isclose(entry[token].logprob, ref[i - 1, token].item(), abs_tol=1e-3)
        assert entry[token].rank == int((ref[i - 1] > ref[i - 1, token]).sum()) + 1
        top = sorted(ref[i - 1].topk(2).indices.tolist())
        assert set(top) <= set(entry) and len(entry) in (2, 3)


# ---- n > 1 -------------------------------------------------------------------------------------------
def test_n_sequences(tiny_llm) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7, ignore_eos=True, logprobs=1)
    out = tiny_llm.generate(PROMPT, params, use_tqdm=False)[0]
    again = tiny_llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.outputs)
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(seqs)) > 1, "n samples should not all be identical"
    assert [c.token_ids for c in again.outputs] == [list(s) for s in seqs]
    assert params.n == 3  # the user's object is not modified
    assert tiny_llm.llm_engine.kv_cache.num_used_blocks == 0


def test_n_sequences_finish_independently(tiny_llm) -> None:
    """The request is finished only once its slowest sequence is."""
    engine = tiny_llm.llm_engine
    params = SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=1, ignore_eos=True)
    engine.add_request("nn", PROMPT, params)
    finished = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "nn"
            assert out.finished == all(c.finish_reason is not None for c in out.outputs)
            if out.finished:
                finished = out
    assert finished is not None and len(finished.outputs) == 2


# ---- chat and streaming through the engine ---------------------------------------------------------------
def test_chat(tiny_llm) -> None:
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    outs = tiny_llm.chat(conversation, greedy(4), use_tqdm=False)
    assert len(outs) == 1
    assert outs[0].prompt.endswith("<|im_start|>assistant\n")
    assert "What is the capital of France?" in outs[0].prompt
    assert len(outs[0].outputs[0].token_ids) == 4
    two = tiny_llm.chat([conversation, conversation + [{"role": "assistant", "content": "Paris"},
                                                      {"role": "user", "content": "Sure?"}]],
                        greedy(4), use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert "Paris" in two[1].prompt
    custom = tiny_llm.chat(conversation, greedy(2), chat_template="{{ messages[0]['content'] }}!", use_tqdm=False)
    assert custom[0].prompt == "What is the capital of France?!"


def test_engine_steps_report_cumulative_outputs(tiny_llm) -> None:
    engine = tiny_llm.llm_engine
    engine.add_request("stream", PROMPT, greedy(5))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append((len(out.outputs[0].token_ids), out.finished))
    assert seen == [(1, False), (2, False), (3, False), (4, False), (5, True)]
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_used_blocks == 0
    assert stats.generation_tokens >= 5 and stats.prompt_tokens >= len(PROMPT["prompt_token_ids"])
