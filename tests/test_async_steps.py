"""Asynchronous steps (the CUDA default) forced on the CPU: a step's tokens are read one call
later and decode inputs come from the previous step's device tensor. Results must equal the
synchronous engine's, with preemption, stops and aborts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pagellm import LLM, SamplingParams


def _prompts(n: int) -> list[dict]:
    rng = random.Random(3)
    return [{"prompt_token_ids": [rng.randint(0, 49151) for _ in range(rng.randint(3, 40))]} for _ in range(n)]


def _run(folder: Path, monkeypatch: pytest.MonkeyPatch, mode: str, params, **kwargs):
    monkeypatch.setenv("PAGELLM_ASYNC_STEPS", mode)
    llm = LLM(str(folder), dtype="float32", **kwargs)
    engine = llm.llm_engine
    assert engine.async_steps == (mode == "force")
    launch = engine.runner.launch
    overlapped = []  # steps launched while the one before was still unread

    def counting_launch(sched, previous=None):
        overlapped.append(previous is not None and previous.sampled is not None)
        return launch(sched, previous)

    monkeypatch.setattr(engine.runner, "launch", counting_launch)
    outs = llm.generate(_prompts(12), params, use_tqdm=False)
    assert engine.kv_cache.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert any(overlapped) == (mode == "force")
    return [o.outputs[0] for o in outs], engine


def _logprobs(output) -> list[dict[int, tuple[float, int]]]:
    return [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in output.logprobs or []]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[5, 17, 300, 4000]),
    # Penalties read the token the previous step sampled from the device; min_tokens counts it. The
    # biases make the outcome hinge on that token: a few favoured ids take turns under the
    # penalties, and the stop id comes the first step min_tokens allows it.
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.5,
                   frequency_penalty=1.0, presence_penalty=0.4, logit_bias={5: 6.0, 17: 6.0, 300: 6.0}),
    SamplingParams(temperature=0.9, seed=3, max_tokens=24, frequency_penalty=1.0, min_tokens=12,
                   stop_token_ids=[17], logit_bias={17: 30.0}),
    # Logprobs are read back with the tokens, one step later.
    SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=0.7, seed=11, max_tokens=16, ignore_eos=True, logprobs=0, presence_penalty=1.2),
])
def test_async_steps_equal_sync(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, params) -> None:
    sync, _ = _run(tiny_llama_dir, monkeypatch, "0", params)
    fast, _ = _run(tiny_llama_dir, monkeypatch, "force", params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in sync]
    assert [o.finish_reason for o in fast] == [o.finish_reason for o in sync]
    assert [_logprobs(o) for o in fast] == [_logprobs(o) for o in sync]
    if params.min_tokens:
        assert all(len(o.token_ids) >= params.min_tokens for o in fast)


def test_async_steps_under_preemption(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    small = dict(num_gpu_blocks_override=14, block_size=8, max_num_batched_tokens=24, enable_prefix_caching=False)
    sync, _ = _run(tiny_llama_dir, monkeypatch, "0", params, **small)
    fast, engine = _run(tiny_llama_dir, monkeypatch, "force", params, **small)
    assert engine.num_preemptions > 0
    assert [o.token_ids for o in fast] == [o.token_ids for o in sync]


def test_padded_logit_rows_change_nothing(tiny_llama_dir: Path) -> None:
    # On CUDA an eager step's LM-head rows are padded to a decode-graph size (ModelRunner._padded_rows);
    # forced here on the CPU, with chunked prefill mixing decodes in, results must not move.
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    results = []
    for pad in (False, True):
        llm = LLM(str(tiny_llama_dir), dtype="float32", max_num_batched_tokens=40)
        llm.llm_engine.runner.pad_logit_rows = pad
        assert llm.llm_engine.runner._padded_rows([4, 9, 2]) == ([4, 9, 2, 2] if pad else [4, 9, 2])
        outs = llm.generate(_prompts(7), params, use_tqdm=False)
        results.append([(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()}
                                                   for step in o.outputs[0].logprobs]) for o in outs])
    for (ids, lps), (padded_ids, padded_lps) in zip(*results):
        assert padded_ids == ids
        for step, padded_step in zip(lps, padded_lps):
            assert padded_step.keys() == step.keys()
            assert all(abs(padded_step[t] - step[t]) < 1e-4 for t in step)  # GEMM blocking may vary with rows
