"""The vLLM CPU backend on the same CPU workloads (run in vLLM's own venv; see benchmarks/RESULTS.md).

    python benchmarks/peers/vllm_cpu.py thr   MODEL_DIR   # cpu-thr: output tok/s of one generate() call
    python benchmarks/peers/vllm_cpu.py lat   MODEL_DIR   # cpu-lat: TPOT, batch 1, 128 in / 128 out, greedy
    python benchmarks/peers/vllm_cpu.py start MODEL_DIR   # cpu-start: construction + first token (process timed outside)
    python benchmarks/peers/vllm_cpu.py pfx MODEL_DIR [N] [off]  # shared-prefix: N requests, 1000-token shared prefix
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def cpu_thr_workload():
    rng = random.Random(0)
    prompts, max_tokens = [], []
    for _ in range(64):
        p = rng.randint(50, 256)
        prompts.append([rng.randint(0, 9999) for _ in range(p)])
        max_tokens.append(rng.randint(50, 256))
    return prompts, max_tokens


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    mode, model = sys.argv[1], sys.argv[2]
    dummy = mode != "start"
    caching = not (len(sys.argv) > 4 and sys.argv[4] == "off")
    t0 = time.perf_counter()
    llm = LLM(model, dtype="bfloat16", load_format="dummy" if dummy else "auto", skip_tokenizer_init=dummy,
              max_model_len=2048, seed=0, enable_prefix_caching=caching)
    built = time.perf_counter() - t0
    if mode == "start":
        out = llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=1), use_tqdm=False)
        print(f"vllm start: engine built in {built:.1f} s, first token at {time.perf_counter() - t0:.1f} s")
        return
    if mode == "thr":
        prompts, max_tokens = cpu_thr_workload()
        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        params = [SamplingParams(temperature=0.6, max_tokens=m, ignore_eos=True, detokenize=False) for m in max_tokens]
        llm.generate(reqs[:2], [SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False)] * 2, use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        n_in = sum(len(p) for p in prompts)
        print(f"vllm cpu-thr: {n_out / elapsed:.1f} output tok/s, {(n_out + n_in) / elapsed:.1f} total tok/s "
              f"({n_out} output / {n_in} prompt tokens in {elapsed:.2f} s)")
    elif mode == "pfx":
        from pagellm.benchmarks.workloads import shared_prefix
        work = shared_prefix(int(sys.argv[3]) if len(sys.argv) > 3 else 200)
        reqs = [TokensPrompt(prompt_token_ids=p) for p in work.prompts]
        params = SamplingParams(temperature=0.0, max_tokens=work.max_tokens[0], ignore_eos=True, detokenize=False)
        llm.generate(reqs[:1], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        ttft = sum(o.metrics.first_token_time - o.metrics.arrival_time for o in outs if o.metrics) / len(outs) \
            if outs[0].metrics is not None else float("nan")
        print(f"vllm shared-prefix (caching {'on' if caching else 'off'}): {n_out / elapsed:.1f} output tok/s, "
              f"{elapsed:.2f} s, mean TTFT {ttft * 1e3:.0f} ms")
    elif mode == "lat":
        rng = random.Random(0)
        prompt = TokensPrompt(prompt_token_ids=[rng.randint(0, 9999) for _ in range(128)])
        greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
        llm.generate([prompt], SamplingParams(max_tokens=8, **greedy), use_tqdm=False)
        tpots = []
        for _ in range(3):
            t1 = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
            t2 = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=128, **greedy), use_tqdm=False)
            t3 = time.perf_counter()
            tpots.append(((t3 - t2) - (t2 - t1)) / 127)
        tpots.sort()
        print(f"vllm cpu-lat: TPOT median {tpots[1] * 1e3:.2f} ms, TTFT {1e3 * (t2 - t1):.1f} ms")


if __name__ == "__main__":
    main()
