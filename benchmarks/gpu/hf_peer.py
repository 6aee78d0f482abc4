"""Peers on the GPU: HF transformers continuous batching (generate_batch) and HF generate at batch 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from pagellm.benchmarks.workloads import standard_workload  # noqa: E402


def load(config_dir: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    return model.eval()


def throughput(args) -> dict:
    from transformers import GenerationConfig
    model = load(args.config)
    work = standard_workload(args.workload)
    prompts = work.prompts[:args.num_prompts]
    gen = GenerationConfig(max_new_tokens=args.output_len, do_sample=True, temperature=0.6, eos_token_id=-1,
                           pad_token_id=0)
    model.generate_batch(prompts[:4], generation_config=gen, max_new_tokens=8)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    return {"peer": "hf generate_batch paged|sdpa", "requests": len(prompts), "output_tokens": tokens,
            "seconds": elapsed, "output_tok_s": tokens / elapsed}


def latency(args) -> dict:
    model = load(args.config)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 9999, (1, args.input_len), device="cuda")
    model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False, min_new_tokens=1)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=args.output_len, do_sample=False, min_new_tokens=args.output_len)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    tpot = ((t2 - t1) - (t1 - t0)) / (args.output_len - 1)
    return {"peer": "hf generate batch 1", "tpot_ms": tpot * 1e3}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["throughput", "latency"])
    p.add_argument("--config", required=True)
    p.add_argument("--workload", default="gpu-thr")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    r = throughput(a) if a.mode == "throughput" else latency(a)
    print(json.dumps(r))
    if a.output_json:
        json.dump(r, open(a.output_json, "w"))
