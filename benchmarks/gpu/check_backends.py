"""GPU correctness: the Triton backend with CUDA graphs against the PyTorch backend (eager).

fp32: same greedy tokens on a tiny random Llama/Qwen3 and a SmolLM2-shaped model with random
weights; bf16 and fp16: close logprobs. Prints PASS/FAIL lines; exits 1 on any failure."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from pagellm import LLM, SamplingParams  # noqa: E402


def tiny_folder(arch: str) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
    kw = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=2048)
    cfg = LlamaConfig(**kw) if arch == "llama" else Qwen3Config(**kw, head_dim=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger weights than HF's init, so logits are not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    return folder


def run(folder, backend, eager, dtype, prompts, load_format="auto", logprobs=None):
    llm = LLM(folder, dtype=dtype, attention_backend=backend, enforce_eager=eager, skip_tokenizer_init=True,
              load_format=load_format, max_model_len=1024, gpu_memory_utilization=0.3, max_num_seqs=64)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, detokenize=False, logprobs=logprobs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    return outs


def main() -> int:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (1, 7, 16, 17, 33, 100, 257, 500)]
    failures = 0
    cases = [("llama", tiny_folder("llama"), "auto"), ("qwen3", tiny_folder("qwen3"), "auto"),
             ("smollm2-shape", os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2-135m"), "dummy")]
    for name, folder, fmt in cases:
        ref = run(folder, "torch", True, "float32", prompts, fmt)
        fast = run(folder, "triton", False, "float32", prompts, fmt)
        same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(ref, fast))
        ok = same == len(prompts)
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} fp32 greedy {name}: {same}/{len(prompts)} prompts identical")
        for half in (("bfloat16", "float16") if name != "smollm2-shape" else ()):
            ref = run(folder, "torch", True, half, prompts, fmt, logprobs=1)
            fast = run(folder, "triton", False, half, prompts, fmt, logprobs=1)
            worst = 0.0
            for a, b in zip(ref, fast):
                for ta, tb, la, lb in zip(a.outputs[0].token_ids, b.outputs[0].token_ids,
                                          a.outputs[0].logprobs, b.outputs[0].logprobs):
                    if ta != tb:
                        break
                    worst = max(worst, abs(la[ta].logprob - lb[tb].logprob))
            ok = worst < 0.1
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} {half} logprobs {name}: max |diff| {worst:.4f} on shared prefix")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
