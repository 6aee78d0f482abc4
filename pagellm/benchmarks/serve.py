"""`pagellm bench serve`: a load generator for any OpenAI-compatible server.

Sends streamed requests at a fixed Poisson rate (or all at once), optionally capped at a
number in flight, and reports request throughput, output and total tokens/s, and the
mean / median / p99 of time to first token (TTFT), time per output token after the first
(TPOT), inter-token latency between streamed chunks (ITL) and end-to-end latency (E2E).

Completions requests send prompts as token id lists with ignore_eos and max_tokens, so
every engine sees exactly the same token counts. Chat needs text: the ids are turned into
text by the server's /detokenize when it has one (pagellm and vLLM do), so lengths are
close to, not exactly, the requested ones. Only httpx is needed (no `openai` package).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pagellm.benchmarks.workloads import Workload, fixed_lengths, per_request_draw, standard_workload

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class RequestResult:
    """What one request measured (times in seconds)."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default=None, help="server URL, e.g. http://127.0.0.1:8000 (overrides host/port)")
    g.add_argument("--host", default="127.0.0.1", help="server host (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="server port (default: 8000)")
    g.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS, help="API to load (default: completions)")
    g.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--api-key", default=None, help="bearer key (default: $PAGELLM_API_KEY or $OPENAI_API_KEY)")
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", default=None, help="a standard workload (cpu-thr, gpu-thr, gpu-8b-thr) instead of "
                                                    "--random-*-len")
    w.add_argument("--dataset-name", default="random", choices=["random"],
                   help="vLLM's flag; only synthetic random token prompts here (default: random)")
    w.add_argument("--num-prompts", type=int, default=None, help="requests to send (default: 64, or the workload's)")
    w.add_argument("--random-input-len", type=int, default=256, help="prompt tokens (default: 256)")
    w.add_argument("--random-output-len", type=int, default=128, help="output tokens (default: 128)")
    w.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="draw lengths uniformly from len*(1-r) .. len*(1+r); 0 = fixed (default: 0)")
    w.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0, or the workload's)")
    w.add_argument("--seed", type=int, default=0, help="seed for prompts and arrival times (default: 0)")
    t = parser.add_argument_group("traffic")
    t.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals; inf sends all at once (default: inf)")
    t.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    t.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout in seconds (default: 3600)")
    parser.add_argument("--output-json", default=None, help="write the results (summary and per request) here")
    parser.add_argument("--quiet", action="store_true", help="print nothing but the final table")


def build_workload(args: argparse.Namespace) -> Workload:
    """The requests to send: a standard workload, or random lengths around the given ones."""
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1; got {args.num_prompts}")
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise ValueError(f"random_range_ratio must be in [0, 1); got {args.random_range_ratio}")
    if args.workload:
        work = standard_workload(args.workload, args.num_prompts)
    else:
        num, r = args.num_prompts or 64, args.random_range_ratio
        i, o = args.random_input_len, args.random_output_len
        if i < 1 or o < 1:
            raise ValueError(f"random_input_len and random_output_len must be >= 1; got {i}, {o}")
        if r == 0.0:
            work = fixed_lengths(num, i, o, 0.0, seed=args.seed)
        else:
            work = per_request_draw(num, (max(1, int(i * (1 - r))), int(i * (1 + r))),
                                    (max(1, int(o * (1 - r))), int(o * (1 + r))), 0.0, seed=args.seed)
    if args.temperature is not None:
        work = Workload(work.prompts, work.max_tokens, args.temperature)
    return work


def arrival_delays(num: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: exponential gaps (Poisson) or none for rate=inf."""
    if rate <= 0:
        raise ValueError(f"request_rate must be > 0 (or inf); got {rate}")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(num)]


# ---- one request ------------------------------------------------------------------------------------


async def _send(client, url: str, payload: dict[str, Any], prompt_len: int, chat: bool) -> RequestResult:
    result = RequestResult(prompt_len=prompt_len)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {body[:500]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"].get("completion_tokens", result.output_tokens)
                    result.prompt_len = event["usage"].get("prompt_tokens", result.prompt_len)
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
        result.latency = time.perf_counter() - start
        result.success = chunks > 0
        if not result.output_tokens:
            result.output_tokens = chunks  # no usage chunk: count chunks as tokens
        if not result.success:
            result.error = "no tokens came back"
    except Exception as exc:  # noqa: BLE001 - a failed request is a measurement, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _payload(endpoint: str, model: str, prompt: list[int] | str, max_tokens: int, temperature: float) -> dict:
    common = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True,
              "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "/v1/chat/completions":
        return {**common, "messages": [{"role": "user", "content": prompt}]}
    return {**common, "prompt": prompt}


# ---- the run ----------------------------------------------------------------------------------------


async def _resolve_model(client, base: str, model: str | None) -> str:
    if model:
        return model
    response = await client.get(f"{base}/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def _texts_for(client, base: str, model: str, prompts: list[list[int]]) -> list[str]:
    """Prompt ids as text for chat, through the server's /detokenize (random words otherwise)."""
    texts = []
    for ids in prompts:
        try:
            response = await client.post(f"{base}/detokenize", json={"model": model, "tokens": ids})
            response.raise_for_status()
            texts.append(response.json()["prompt"])
        except Exception:  # noqa: BLE001 - servers without /detokenize get plain words
            rng = random.Random(len(texts))
            texts.append(" ".join(rng.choice(("alpha", "beta", "gamma", "delta")) for _ in ids))
    return texts


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the load and returns the results dict (what --output-json writes)."""
    import httpx

    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    work = build_workload(args)
    delays = arrival_delays(len(work.prompts), args.request_rate, args.seed)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1; got {args.max_concurrency}")
    key = args.api_key or os.environ.get("PAGELLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limit = args.max_concurrency or len(work.prompts)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        model = await _resolve_model(client, base, args.model)
        chat = args.endpoint == "/v1/chat/completions"
        prompts: list[Any] = await _texts_for(client, base, model, work.prompts) if chat else work.prompts
        gate = asyncio.Semaphore(limit)
        url = base + args.endpoint

        async def one(i: int) -> RequestResult:
            async with gate:
                payload = _payload(args.endpoint, model, prompts[i], work.max_tokens[i], work.temperature)
                return await _send(client, url, payload, len(work.prompts[i]), chat)

        tasks = []
        start = time.perf_counter()
        for i, delay in enumerate(delays):
            if delay:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(results, duration)
    summary.update(model=model, endpoint=args.endpoint, base_url=base, request_rate=args.request_rate,
                   max_concurrency=args.max_concurrency, num_prompts=len(work.prompts),
                   workload=args.workload or f"random {args.random_input_len}/{args.random_output_len} "
                                             f"r={args.random_range_ratio}")
    summary["requests"] = [asdict(r) for r in results]
    return summary


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    values = sorted(v * 1000.0 for v in values_s)
    if not values:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"p99_{name}_ms": 0.0}
    p99 = values[min(len(values) - 1, max(0, math.ceil(0.99 * len(values)) - 1))]
    return {f"mean_{name}_ms": statistics.fmean(values), f"median_{name}_ms": statistics.median(values),
            f"p99_{name}_ms": p99}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Throughputs over the whole run and latency statistics over successful requests."""
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out: dict[str, Any] = {
        "duration_s": duration, "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
    }
    out.update(_stats("ttft", [r.ttft for r in ok]))
    out.update(_stats("tpot", tpots))
    out.update(_stats("itl", [x for r in ok for x in r.itl]))
    out.update(_stats("e2el", [r.latency for r in ok]))
    errors = [r.error for r in results if not r.success]
    if errors:
        out["first_error"] = errors[0]
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = ["=" * 20 + " Serving Benchmark Result " + "=" * 20,
             f"{'Successful requests:':<40}{s['completed']:>12}",
             f"{'Failed requests:':<40}{s['failed']:>12}",
             f"{'Benchmark duration (s):':<40}{s['duration_s']:>12.2f}",
             f"{'Total input tokens:':<40}{s['total_input_tokens']:>12}",
             f"{'Total generated tokens:':<40}{s['total_output_tokens']:>12}",
             f"{'Request throughput (req/s):':<40}{s['request_throughput']:>12.2f}",
             f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:>12.2f}",
             f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:>12.2f}"]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{'-' * 15}{title:^36}{'-' * 15}"[:66])
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {name.upper()} (ms):"
            lines.append(f"{label:<40}{s[f'{stat}_{name}_ms']:>12.2f}")
    if s.get("first_error"):
        lines.append(f"first error: {s['first_error']}")
    lines.append("=" * 66)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if not args.quiet:
        rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s (Poisson)"
        print(f"bench serve: {args.endpoint}, request rate {rate}, max concurrency {args.max_concurrency or 'none'}",
              file=sys.stderr)
    summary = asyncio.run(run_benchmark(args))
    print(format_summary(summary))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
