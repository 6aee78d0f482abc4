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
    assert llm.llm_engine.async_steps == (mode == "force")
    outs = llm.generate(_prompts(12), params, use_tqdm=False)
    engine = llm.llm_engine
    assert engine.kv_cache.num_used_blocks == 0 and not engine.has_unfinished_requests()
    return [o.outputs[0] for o in outs], engine


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[5, 17, 300, 4000]),
])
def test_async_steps_equal_sync(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, params) -> None:
    sync, _ = _run(tiny_llama_dir, monkeypatch, "0", params)
    fast, _ = _run(tiny_llama_dir, monkeypatch, "force", params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in sync]
    assert [o.finish_reason for o in fast] == [o.finish_reason for o in sync]


def test_async_steps_under_preemption(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    small = dict(num_gpu_blocks_override=14, block_size=8, max_num_batched_tokens=24, enable_prefix_caching=False)
    sync, _ = _run(tiny_llama_dir, monkeypatch, "0", params, **small)
    fast, engine = _run(tiny_llama_dir, monkeypatch, "force", params, **small)
    assert engine.num_preemptions > 0
    assert [o.token_ids for o in fast] == [o.token_ids for o in sync]
