"""Host time of the gpu-thr prefill phase: cProfile over a run whose requests stop after a few
tokens (so prefill steps dominate), and the host cost of one large prefill GEMM launch with
cuBLAS against cuBLASLt. Prints the top functions by cumulative time.

usage: python benchmarks/gpu/host_profile.py [CONFIG] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from pagellm import LLM, SamplingParams
from pagellm.benchmarks.workloads import standard_workload


def linear_host_us(library: str, rows: int = 16384) -> float:
    torch.backends.cuda.preferred_blas_library(library)
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        F.linear(x, w)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        F.linear(x, w)
    host = (time.perf_counter() - t) / 20 * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?", default="benchmarks/configs/qwen3-0.6b")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    default = torch.backends.cuda.preferred_blas_library()
    for lib in ("cublas", "cublaslt"):
        print(f"F.linear [16384x1024] x [4096x1024]^T host time, {lib}: {linear_host_us(lib):.1f} us per call")
    torch.backends.cuda.preferred_blas_library(default)

    llm = LLM(args.config, load_format="dummy", dtype="bfloat16", max_model_len=4096, skip_tokenizer_init=True)
    work = standard_workload("gpu-thr", None)
    prompts = [{"prompt_token_ids": t} for t in work.prompts]
    params = SamplingParams(temperature=0.6, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:8], params, use_tqdm=False)
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    print(f"prefill-phase run without profiler: {time.perf_counter() - t:.3f} s")
    # Fresh prompts (first token changed), so the profiled run finds nothing in the prefix cache.
    prompts = [{"prompt_token_ids": [(t["prompt_token_ids"][0] + 1) % 10000] + t["prompt_token_ids"][1:]}
               for t in prompts]
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profiler.disable()
    print(f"with cProfile: {time.perf_counter() - t:.3f} s")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
