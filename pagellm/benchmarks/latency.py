"""`pagellm bench latency`: time per output token (TPOT) and time to first token for one batch."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from pagellm.models.loader import LOAD_FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-iters-warmup", type=int, default=1)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory", default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)


def _one_run(engine, prompts, output_len) -> tuple[float, float, float]:
    """(time to first token, mean time per later token, end-to-end latency) for one batch, timed at the
    engine's steps."""
    from pagellm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(engine.new_request_id(), {"prompt_token_ids": p}, params)
    first = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and outs:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (end - first) / max(output_len - 1, 1), end - start


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def main(args: argparse.Namespace) -> None:
    from pagellm import LLM

    llm = LLM(args.model, dtype=args.dtype, load_format=args.load_format, max_model_len=args.max_model_len,
              kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, seed=args.seed, max_num_seqs=max(args.batch_size, 1),
              skip_tokenizer_init=True)
    engine = llm.llm_engine
    rng = random.Random(args.seed)
    prompts = [[rng.randint(0, 9999) for _ in range(args.input_len)] for _ in range(args.batch_size)]
    for _ in range(args.num_iters_warmup):
        _one_run(engine, prompts, args.output_len)
    ttfts, tpots, latencies = [], [], []
    for _ in range(args.num_iters):
        ttft, tpot, latency = _one_run(engine, prompts, args.output_len)
        ttfts.append(ttft)
        tpots.append(tpot)
        latencies.append(latency)
    result = {"batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
              "ttft_ms_median": 1e3 * statistics.median(ttfts), "tpot_ms_median": 1e3 * statistics.median(tpots),
              "tpot_ms_all": [1e3 * t for t in tpots], "ttft_ms_all": [1e3 * t for t in ttfts],
              # vLLM's keys: a whole batch's latency in seconds, per iteration and its percentiles.
              "avg_latency": statistics.fmean(latencies), "latencies": latencies,
              "percentiles": {q: _percentile(latencies, q) for q in (10, 25, 50, 75, 90, 99)}}
    print(f"TPOT median {result['tpot_ms_median']:.2f} ms, TTFT median {result['ttft_ms_median']:.1f} ms "
          f"(batch {args.batch_size}, {args.input_len} in / {args.output_len} out, {args.num_iters} runs); "
          f"avg latency {result['avg_latency']:.4f} s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    main(p.parse_args())
