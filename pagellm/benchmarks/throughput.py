"""`pagellm bench throughput`: offline output tokens per second over one generate() call."""

from __future__ import annotations

import argparse
import json
import logging
import time

from pagellm.benchmarks.workloads import Workload, fixed_lengths, per_request_draw, standard_workload
from pagellm.models.loader import LOAD_FORMATS


# Named, not __name__: run as `python -m` this module is __main__, outside the pagellm log setup.
logger = logging.getLogger("pagellm.benchmarks.throughput")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--workload", default=None, help="a standard workload: cpu-thr, gpu-thr, gpu-8b-thr")
    parser.add_argument("--dataset-name", default="random", choices=["random"],
                        help="vLLM's flag; only synthetic random token prompts here")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=None, help="fixed prompt length")
    parser.add_argument("--output-len", type=int, default=None, help="fixed max_tokens")
    parser.add_argument("--random-input-len", type=int, default=None)
    parser.add_argument("--random-output-len", type=int, default=None)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--kv-cache-memory", default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--profile", action="store_true", help="print where host time goes (cProfile)")


def build_workload(args: argparse.Namespace) -> Workload:
    if args.workload:
        work = standard_workload(args.workload, args.num_prompts)
        if args.output_len is not None:
            work = Workload(work.prompts, [args.output_len] * len(work.prompts), work.temperature)
    elif args.input_len is not None:
        work = fixed_lengths(args.num_prompts or 64, args.input_len, args.output_len or 128, 0.0)
    elif args.random_input_len is not None:
        r = args.random_range_ratio
        i, o = args.random_input_len, args.random_output_len or 128
        work = per_request_draw(args.num_prompts or 64, (int(i * (1 - r)), int(i * (1 + r))),
                                (int(o * (1 - r)), int(o * (1 + r))), 0.0)
    else:
        work = standard_workload("cpu-thr", args.num_prompts)
    if args.temperature is not None:
        work = Workload(work.prompts, work.max_tokens, args.temperature)
    return work


def make_llm(args: argparse.Namespace):
    from pagellm import LLM
    return LLM(args.model, dtype=args.dtype, load_format=args.load_format, max_model_len=args.max_model_len,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
               enforce_eager=args.enforce_eager, seed=args.seed, skip_tokenizer_init=True,
               enable_prefix_caching=args.enable_prefix_caching)


def main(args: argparse.Namespace) -> None:
    from pagellm import SamplingParams

    t0 = time.perf_counter()
    llm = make_llm(args)
    startup = time.perf_counter() - t0
    work = build_workload(args)
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    params = [SamplingParams(temperature=work.temperature, max_tokens=m, ignore_eos=True, detokenize=False)
              for m in work.max_tokens]
    # Warm-up: a short call so one-time costs stay out of the figure. Its prompts are the first two
    # reversed, so the timed run finds none of its own blocks in the prefix cache.
    warmup = [{"prompt_token_ids": p["prompt_token_ids"][::-1]} for p in prompts[:2]]
    llm.generate(warmup, [SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False)] * 2, use_tqdm=False)
    profiler = None
    if args.profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    logger.info("timed run: %d requests", len(prompts))
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    if profiler is not None:
        import pstats
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "elapsed_time": elapsed, "num_requests": len(outs), "prompt_tokens": work.num_prompt_tokens,
        "output_tokens": out_tokens, "requests_per_second": len(outs) / elapsed,
        "output_tokens_per_second": out_tokens / elapsed,
        "total_num_tokens": out_tokens + work.num_prompt_tokens,
        "tokens_per_second": (out_tokens + work.num_prompt_tokens) / elapsed, "startup_seconds": startup,
        "num_preemptions": llm.llm_engine.num_preemptions,
        "prefix_cache_hit_rate": llm.llm_engine.stats().prefix_cache_hit_rate,
        "mean_ttft_seconds": sum(o.metrics.first_token_time - o.metrics.arrival_time for o in outs) / len(outs),
    }
    print(f"Throughput: {result['requests_per_second']:.2f} requests/s, {result['tokens_per_second']:.2f} total "
          f"tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s "
          f"({out_tokens} output / {work.num_prompt_tokens} prompt tokens in {elapsed:.2f} s; "
          f"mean TTFT {result['mean_ttft_seconds'] * 1e3:.0f} ms, prefix-cache hit rate "
          f"{result['prefix_cache_hit_rate']:.2f})")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    main(p.parse_args())
