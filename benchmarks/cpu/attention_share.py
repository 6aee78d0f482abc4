"""How much of an offline CPU run is attention: times the attention backend's calls inside `generate`.

Runs the first `--num-prompts` cpu-thr requests (SmolLM2-135M shape, dummy weights, bf16) after a
short warm-up and prints the whole generate time and the time spent in the attention backend.
Alternate it with PAGELLM_CPU_ATTENTION_KERNEL=0 (gather + SDPA) to compare the two paths.

    python benchmarks/cpu/attention_share.py --num-prompts 32
"""

from __future__ import annotations

import argparse
import os
import time

from pagellm import LLM, SamplingParams
from pagellm.benchmarks.workloads import standard_workload
from pagellm.layers.attention import torch_backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="benchmarks/configs/smollm2-135m")
    p.add_argument("--num-prompts", type=int, default=32)
    args = p.parse_args()
    spent = {"seconds": 0.0, "calls": 0}
    forward = torch_backend.TorchAttentionBackend.forward

    def timed_forward(self, *a, **k):
        start = time.perf_counter()
        out = forward(self, *a, **k)
        spent["seconds"] += time.perf_counter() - start
        spent["calls"] += 1
        return out

    torch_backend.TorchAttentionBackend.forward = timed_forward
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True)
    work = standard_workload("cpu-thr", None)
    prompts = [{"prompt_token_ids": t} for t in work.prompts][:args.num_prompts]
    params = [SamplingParams(temperature=work.temperature, max_tokens=m, ignore_eos=True, detokenize=False)
              for m in work.max_tokens][:args.num_prompts]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    spent.update(seconds=0.0, calls=0)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - start
    kernel = os.environ.get("PAGELLM_CPU_ATTENTION_KERNEL", "1")
    print(f"PAGELLM_CPU_ATTENTION_KERNEL={kernel}: generate {total:.2f} s, attention {spent['seconds']:.2f} s "
          f"in {spent['calls']} calls")


if __name__ == "__main__":
    main()
