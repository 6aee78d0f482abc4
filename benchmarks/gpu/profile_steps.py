"""Where a gpu-thr step's time goes: per-step host time, and a device profile of two windows.

Runs the gpu-thr workload (Qwen3-0.6B shape, dummy weights) once for warm-up, then again with
every engine step timed on the host and torch.profiler recording two windows: early steps
(prefill chunks mixed with decodes) and mid-run steps (decode only). For each window it prints
the wall time, the device's busy time (sum of kernel times) and the top kernels, and it writes
a Chrome trace of each window to $OUT.

usage: python benchmarks/gpu/profile_steps.py [CONFIG] [--num-prompts N] [--latency --windows 20:100]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from pagellm import LLM, SamplingParams
from pagellm.benchmarks.workloads import standard_workload


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?", default="benchmarks/configs/qwen3-0.6b")
    p.add_argument("--workload", default="gpu-thr")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--windows", default="4:16,400:440", help="step ranges to profile, a:b,...")
    p.add_argument("--latency", action="store_true",
                   help="gpu-lat instead: one prompt of 512 random ids, 128 greedy tokens")
    args = p.parse_args()
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)

    llm = LLM(args.config, load_format="dummy", dtype="bfloat16", max_model_len=4096, skip_tokenizer_init=True,
              kv_cache_memory=None if torch.cuda.is_available() else "1GiB")
    if args.latency:
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randint(0, 10000) for _ in range(512)]}]
        params = [SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True, detokenize=False)]
    else:
        work = standard_workload(args.workload, args.num_prompts)
        prompts = [{"prompt_token_ids": t} for t in work.prompts]
        params = [SamplingParams(temperature=work.temperature, max_tokens=m, ignore_eos=True, detokenize=False)
                  for m in work.max_tokens]
    llm.generate(prompts[:1] * 2, [SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False)] * 2,
                 use_tqdm=False)

    engine = llm.llm_engine
    windows = [tuple(int(x) for x in w.split(":")) for w in args.windows.split(",")]
    real_step = engine.step
    step_times: list[tuple[int, int, int, float]] = []  # (step, tokens, seqs, host seconds)
    state = {"i": 0, "prof": None, "t0": 0.0}
    launch_real = engine.runner.launch
    last_shape = {"tokens": 0, "seqs": 0}

    def launch(sched, previous=None):
        last_shape["tokens"] = sched.num_tokens
        last_shape["seqs"] = len(sched.scheduled)
        return launch_real(sched, previous)

    engine.runner.launch = launch

    def step():
        i = state["i"]
        for w, (a, b) in enumerate(windows):
            if i == a:
                sync()
                state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            if i == b and state["prof"] is not None:
                sync()
                wall = time.perf_counter() - state["t0"]
                prof = state["prof"]
                prof.__exit__(None, None, None)
                report(prof, wall, b - a, f"window{w}_steps{a}-{b}", out_dir)
                state["prof"] = None
        t = time.perf_counter()
        out = real_step()
        step_times.append((i, last_shape["tokens"], last_shape["seqs"], time.perf_counter() - t))
        state["i"] = i + 1
        return out

    engine.step = step
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"run: {len(step_times)} steps, {elapsed:.2f} s, {n_out / elapsed:.0f} output tok/s (profiler windows "
          f"included)")
    # Host time per step by kind: prefill-bearing vs decode-only.
    kinds = defaultdict(list)
    for _, tokens, seqs, dt in step_times:
        kinds["decode-only" if tokens == seqs else "with prefill"].append(dt)
    for kind, ts in kinds.items():
        ts = sorted(ts)
        print(f"  {kind}: {len(ts)} steps, total {sum(ts):.2f} s, median {ts[len(ts) // 2] * 1e3:.2f} ms")
    with open(os.path.join(out_dir, "steps.tsv"), "w") as f:
        f.write("step\ttokens\tseqs\tseconds\n")
        for row in step_times:
            f.write("\t".join(str(x) for x in row) + "\n")


def report(prof, wall: float, steps: int, name: str, out_dir: str) -> None:
    events = prof.key_averages()
    kernel_us = 0.0
    rows = []
    for e in events:
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        if dev > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us += dev
            rows.append((dev, e.count, e.key))
    rows.sort(reverse=True)
    print(f"== {name}: wall {wall * 1e3:.1f} ms for {steps} steps ({wall / steps * 1e3:.2f} ms/step), device busy "
          f"{kernel_us / 1e3:.1f} ms ({kernel_us / 1e3 / (wall * 1e3) * 100:.0f}%)")
    for dev, count, key in rows[:int(os.environ.get("PROF_TOP", 18))]:
        print(f"   {dev / 1e3:9.2f} ms  {count:6d}x  {key[:90]}")
    cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    print("   host (self CPU):")
    for e in cpu:
        print(f"   {e.self_cpu_time_total / 1e3:9.2f} ms  {e.count:6d}x  {e.key[:90]}")
    prof.export_chrome_trace(os.path.join(out_dir, f"{name}.json"))
    os.system(f"gzip -f {os.path.join(out_dir, name)}.json")


if __name__ == "__main__":
    main()
