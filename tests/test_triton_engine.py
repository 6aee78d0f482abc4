"""The whole Triton path on a model: paged-attention and cache-write kernels plus the fused RMSNorm,
q/k norm + RoPE and SiLU-and-mul kernels give the torch backend's greedy tokens and logprobs.
On the CPU the kernels run in Triton's interpreter (slow, so two short prompts); benchmarks/gpu/
check_backends.py does the same on the GPU at larger sizes, with CUDA graphs."""

from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams

PROMPTS = [[5, 17, 300, 42, 9, 8, 1000], [77, 3, 3, 12, 6000]]


def _run(folder, backend: str, warm_up: bool = False):
    # 8 tokens a step: the second prompt is chunked, so step 2 is a mixed step (the first prompt's
    # decode and the rest of the second prompt), which the Triton backend attends in two launches.
    llm = LLM(str(folder), dtype="float32", kv_cache_memory="16MiB", attention_backend=backend,
              enforce_eager=True, max_num_seqs=4, max_num_batched_tokens=8)
    if warm_up:
        # Start-up's mixed steps (run there on CUDA only) write K/V into blocks 0 and 1, which the
        # requests get next: that stale data must never be read.
        llm.llm_engine.runner._warm_up_mixed_steps()
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
    return llm, llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_triton_path_equals_torch_backend(tiny_model_dirs, kind, monkeypatch):
    from pagellm.kernels.triton import skinny_gemm as skinny_module
    rope_calls = []
    original = skinny_module.skinny_gemm_rope
    monkeypatch.setattr(skinny_module, "skinny_gemm_rope", lambda *a, **k: rope_calls.append(1) or original(*a, **k))
    folder = tiny_model_dirs(kind)
    fast_llm, fast = _run(folder, "triton", warm_up=True)
    model = fast_llm.llm_engine.runner.model
    assert model.model.fused_rope and model.model.norm.use_triton  # the fused kernels really ran
    # Decode steps of Llama (no q/k norm) take RoPE and the cache stores in the qkv GEMM's epilogue.
    assert bool(rope_calls) == (kind == "llama")
    _, ref = _run(folder, "torch")
    for a, b in zip(fast, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-4
