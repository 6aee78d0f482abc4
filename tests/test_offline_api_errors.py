"""The offline API against vLLM: bad input gets a ValueError naming the field, and a
failed call leaves nothing queued and no KV block held."""

from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams

GOOD = {"prompt_token_ids": [10, 11, 12]}


def _idle(llm: LLM) -> None:
    """Nothing of a finished or failed call is left in the engine."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.groups == {}
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.kv_cache.num_used_blocks == 0
    assert engine.runner.generators == {}


# ---- seeds of n > 1 requests ------------------------------------------------------------------------
def test_seed_of_last_sibling_must_fit_the_generator_range() -> None:
    # Sibling i of an n > 1 request samples with seed + i (as in vLLM), so the largest seed
    # torch accepts leaves no room for a second sibling.
    SamplingParams(n=1, seed=2**64 - 1)
    SamplingParams(n=2, seed=2**64 - 2)
    with pytest.raises(ValueError, match="^seed "):
        SamplingParams(n=2, seed=2**64 - 1)


def test_bad_seed_in_a_batch_queues_nothing(tiny_llm) -> None:
    params = SamplingParams(n=2, max_tokens=2)
    params.seed = 2**64 - 1  # set after creation: validation is skipped, as in vLLM
    with pytest.raises(ValueError):
        tiny_llm.generate([GOOD, GOOD], [SamplingParams(max_tokens=2), params], use_tqdm=False)
    _idle(tiny_llm)


def test_failure_while_queueing_aborts_the_queued_requests(tiny_llm, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that passed validation but fails to queue takes back the ones queued before it."""
    engine = tiny_llm.llm_engine
    original = engine.add_request
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure while queueing")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "add_request", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        tiny_llm.generate([GOOD] * 4, SamplingParams(n=2, seed=3, max_tokens=2), use_tqdm=False)
    monkeypatch.setattr(engine, "add_request", original)
    _idle(tiny_llm)
    out = tiny_llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 3
    _idle(tiny_llm)


# ---- seed=-1 ------------------------------------------------------------------------------------------
def test_seed_minus_one_means_no_seed() -> None:
    # vLLM (and the OpenAI API) read seed=-1 as "random": it must not fix the draws.
    params = SamplingParams(seed=-1)
    assert params.seed is None
    assert params.sampling_type.name == "RANDOM"
    assert SamplingParams(seed=-2).seed == -2


# ---- best_of --------------------------------------------------------------------------------------------
def test_best_of_greater_than_n_is_refused() -> None:
    # Nothing ranks best_of candidates: accepting it would silently return n plain samples.
    # vLLM V1 refuses best_of too.
    assert SamplingParams(n=2, best_of=2).best_of == 2
    with pytest.raises(ValueError, match="^best_of "):
        SamplingParams(best_of=3)
    with pytest.raises(ValueError, match="^best_of "):
        SamplingParams(n=2, best_of=4)


# ---- prompt_token_ids that are not a list ----------------------------------------------------------------
@pytest.mark.parametrize("ids", [5, None, 2.5])
def test_prompt_token_ids_not_a_list(tiny_llm, ids) -> None:
    with pytest.raises(ValueError, match="prompt_token_ids"):
        tiny_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2), use_tqdm=False)
    _idle(tiny_llm)


# ---- tiny temperatures ------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-6, 1e-4, 0.005])
def test_tiny_temperature_is_raised_to_0_01_not_made_greedy(temperature: float) -> None:
    # vLLM raises 0 < temperature < 0.01 to 0.01 (smaller values overflow logits / T) and keeps
    # sampling: n > 1 and the truncation settings stay valid. Only 0 means greedy.
    params = SamplingParams(temperature=temperature, n=2, top_k=5, top_p=0.5, seed=3)
    assert params.temperature == 0.01
    assert not params.is_greedy
    assert params.sampling_type.name == "RANDOM_SEED"
    assert (params.n, params.top_k, params.top_p) == (2, 5, 0.5)
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=0.01).temperature == 0.01


# ---- numpy token ids ----------------------------------------------------------------------------------------
def test_numpy_integer_token_ids_are_taken_as_ints(tiny_llm) -> None:
    import numpy as np
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    numpy_ids = {"prompt_token_ids": list(np.array(GOOD["prompt_token_ids"], dtype=np.int64))}
    out_numpy = tiny_llm.generate(numpy_ids, params, use_tqdm=False)[0]
    out_plain = tiny_llm.generate(GOOD, params, use_tqdm=False)[0]
    assert out_numpy.prompt_token_ids == GOOD["prompt_token_ids"]
    assert all(type(t) is int for t in out_numpy.prompt_token_ids)
    assert out_numpy.outputs[0].token_ids == out_plain.outputs[0].token_ids
    with pytest.raises(ValueError, match="prompt_token_ids"):
        tiny_llm.generate({"prompt_token_ids": [np.float32(3.0)]}, params, use_tqdm=False)
    _idle(tiny_llm)


# ---- named chat templates ---------------------------------------------------------------------------------
def test_named_chat_templates_pick_the_default(tiny_llm) -> None:
    # tokenizer_config.json may hold a list of named templates, which transformers loads as a dict:
    # chat uses "default" (as transformers and vLLM do), and an explicit template still wins.
    processor = tiny_llm.llm_engine.inputs
    tokenizer = processor.tokenizer
    saved = tokenizer.chat_template
    messages = [{"role": "user", "content": "hi"}]
    try:
        tokenizer.chat_template = {"default": "D:{{ messages[0]['content'] }}",
                                   "tool_use": "T:{{ messages[0]['content'] }}"}
        assert processor.render_chat(messages) == "D:hi"
        assert processor.render_chat(messages, chat_template="X:{{ messages[0]['content'] }}") == "X:hi"
    finally:
        tokenizer.chat_template = saved
