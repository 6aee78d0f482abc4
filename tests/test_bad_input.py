"""Every bad input raises ValueError naming the field, and the engine stays usable after it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pagellm import LLM, SamplingParams

GOOD = {"prompt_token_ids": [10, 11, 12]}


def _still_works(llm: LLM) -> None:
    """The next request succeeds and nothing of the failed one is left behind."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_used_blocks == 0
    out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3 and out[0].finished
    assert engine.kv_cache.num_used_blocks == 0


# ---- prompts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, field", [
    ("", "prompt"),
    ({"prompt_token_ids": []}, "prompt"),
    ([], "prompts"),
    ({"prompt_token_ids": [1, 2, 49152]}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, -1]}, "prompt_token_ids"),
    ({"text": "hi"}, "prompt"),
    (3.5, "prompt"),
])
def test_bad_prompt(tiny_llm, prompt, field) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)
    _still_works(tiny_llm)


def test_prompt_longer_than_max_model_len(tiny_llm) -> None:
    limit = tiny_llm.llm_engine.model_config.max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        tiny_llm.generate({"prompt_token_ids": [5] * (limit + 1)}, SamplingParams(max_tokens=2), use_tqdm=False)
    _still_works(tiny_llm)


def test_one_bad_prompt_queues_nothing(tiny_llm) -> None:
    with pytest.raises(ValueError, match="prompt"):
        tiny_llm.generate([GOOD, "", GOOD], SamplingParams(max_tokens=2), use_tqdm=False)
    _still_works(tiny_llm)


# ---- sampling parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, r"\bn\b"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"logprobs": 100}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_bad_sampling_params(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_token_ids_in_params_checked_against_vocab(tiny_llm) -> None:
    with pytest.raises(ValueError, match="stop_token_ids"):
        tiny_llm.generate(GOOD, SamplingParams(stop_token_ids=[10 ** 6]), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        tiny_llm.generate(GOOD, SamplingParams(logit_bias={10 ** 6: 1.0}), use_tqdm=False)
    _still_works(tiny_llm)


def test_sampling_params_of_wrong_type_or_count(tiny_llm) -> None:
    with pytest.raises(ValueError, match="sampling_params"):
        tiny_llm.generate([GOOD, GOOD], [SamplingParams(max_tokens=2)], use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        tiny_llm.generate(GOOD, {"max_tokens": 2}, use_tqdm=False)
    _still_works(tiny_llm)


def test_request_that_cannot_fit_in_the_kv_pool(tiny_llama_dir) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=8, num_gpu_blocks_override=4)
    with pytest.raises(ValueError, match="kv_cache_memory|max_tokens"):
        llm.generate({"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=20), use_tqdm=False)
    # max_tokens=None may run to max_model_len, which the pool cannot hold: refused, not stuck.
    with pytest.raises(ValueError, match="kv_cache_memory|max_tokens"):
        llm.generate(GOOD, SamplingParams(max_tokens=None), use_tqdm=False)
    _still_works(llm)


def test_duplicate_request_id(tiny_llm) -> None:
    engine = tiny_llm.llm_engine
    engine.add_request("dup", GOOD, SamplingParams(max_tokens=2))
    try:
        with pytest.raises(ValueError, match="request_id"):
            engine.add_request("dup", GOOD, SamplingParams(max_tokens=2))
    finally:
        engine.abort_request("dup")
    _still_works(tiny_llm)


def test_chat_without_messages(tiny_llm) -> None:
    with pytest.raises(ValueError, match="messages"):
        tiny_llm.chat([], use_tqdm=False)
    with pytest.raises(ValueError, match="message"):
        tiny_llm.chat([{"content": "no role"}], use_tqdm=False)
    _still_works(tiny_llm)


# ---- engine arguments and model files ------------------------------------------------------------------
def test_unknown_model_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model"):
        LLM(str(tmp_path / "no-such-model"))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture_names_supported_ones(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewForCausalLM") as info:
        LLM(str(folder), dtype="float32")
    message = str(info.value)
    assert "architecture" in message
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in message


def test_unreadable_weights_file(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    with pytest.raises(ValueError, match="weights file"):
        LLM(str(folder), dtype="float32")


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00truncated"])
def test_unreadable_gguf_file(tmp_path: Path, content: bytes) -> None:
    file = tmp_path / "broken.gguf"
    file.write_bytes(content)
    with pytest.raises(ValueError, match="GGUF file"):
        LLM(str(file))


def test_missing_weights_file(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(folder), dtype="float32")


def test_not_a_model_file(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_bytes(b"hello")
    with pytest.raises(ValueError, match="gguf"):
        LLM(str(file))


@pytest.mark.parametrize("kwargs, field", [
    ({"dtype": "float8"}, "dtype"),
    ({"block_size": 3}, "block_size"),
    ({"load_format": "pickle"}, "load_format"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"num_gpu_blocks_override": 0}, "num_gpu_blocks_override"),
    ({"max_model_len": 10 ** 6}, "max_model_len"),
    ({"not_an_argument": 1}, "not_an_argument"),
])
def test_bad_engine_arguments(tiny_llama_dir: Path, kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        LLM(str(tiny_llama_dir), **kwargs)


def test_failure_mid_generation_leaves_engine_usable(tiny_llm, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception inside a step (here: the model) aborts that call's requests, nothing else."""
    runner = tiny_llm.llm_engine.runner
    original = runner.launch
    calls = {"n": 0}

    def failing(sched, previous=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure in the forward pass")
        return original(sched, previous)

    monkeypatch.setattr(runner, "launch", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        tiny_llm.generate([GOOD] * 4, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    monkeypatch.setattr(runner, "launch", original)
    assert runner.generators == {}
    _still_works(tiny_llm)
