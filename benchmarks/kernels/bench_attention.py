"""Times Triton paged decode attention on the GPU and reports achieved memory bandwidth.

Decode attention is bound by reading the KV cache, so the figure of merit is bytes moved per
second against the H200's 4.24 TB/s measured copy bandwidth (a read-only stream can beat a copy,
so a little over 100% is possible). Run on a CUDA machine:

    python benchmarks/kernels/bench_attention.py                       # Llama-3-8B shapes, bf16
    python benchmarks/kernels/bench_attention.py --head-dim 256 --num-heads 16 --num-kv-heads 8
    python benchmarks/kernels/bench_attention.py --compare-splits      # also time split-KV off
    python benchmarks/kernels/bench_attention.py --config 16x64x4x3 --config 16x128x8x2   # tile sweep
    python benchmarks/kernels/bench_attention.py --num-heads 16 --gpu-thr-steps 100 400 800
        # gpu-thr's ragged decode batches at those steps: programs in batch order vs longest first
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.testing

from pagellm.benchmarks.workloads import standard_workload
from pagellm.kernels.triton.paged_attention import AttentionKernelConfig, paged_attention, select_num_splits

PEAK_BYTES_PER_S = 4.24e12


def build_decode_step(batch: int, context: int | list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                      block_size: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """A decode step: `batch` sequences of `context` keys each (or contexts[i] for sequence i), their
    blocks shuffled over the pool."""
    contexts = context if isinstance(context, list) else [context] * batch
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = -(-max(contexts) // block_size)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    block_tables = order.view(batch, blocks_per_seq)                                   # [B, nb]
    return dict(
        query=torch.randn(batch, num_heads, head_dim, device="cuda", dtype=dtype, generator=gen),
        k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
        seq_lens=torch.tensor(contexts, device="cuda", dtype=torch.int32),
        query_start_loc=torch.arange(batch + 1, device="cuda", dtype=torch.int32),
    )


def gpu_thr_contexts(step: int) -> list[int]:
    """Context lengths of the sequences still decoding at decode step `step` of gpu-thr."""
    workload = standard_workload("gpu-thr")
    return [len(p) + step for p, n in zip(workload.prompts, workload.max_tokens) if n > step]


def bench_ragged(args, dtype: torch.dtype, scale: float) -> None:
    """gpu-thr's decode batches: programs in batch order against longest first, graph replay."""
    elem_size = torch.finfo(dtype).bits // 8
    print(f"{'step':>5} {'seqs':>5} {'keys':>8} {'us batch order':>15} {'us longest first':>17} {'GB/s':>8}")
    for t in args.gpu_thr_steps:
        contexts = gpu_thr_contexts(t)
        batch = len(contexts)
        step = build_decode_step(batch, contexts, args.num_heads, args.num_kv_heads, args.head_dim,
                                 args.block_size, dtype)
        out = torch.empty_like(step["query"])
        call_args = [step[k] for k in ("query", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc")]
        longest = torch.argsort(step["seq_lens"], descending=True, stable=True).to(torch.int32)
        times = []
        for order in (None, longest):
            def run(order=order) -> None:
                paged_attention(*call_args, 1, 4096, scale, out=out, seq_order=order)
            run()
            torch.cuda.synchronize()
            times.append(time_ms(run, not args.no_graph))
        total = sum(2 * c * args.num_kv_heads * args.head_dim * elem_size for c in contexts)
        print(f"{t:>5} {batch:>5} {sum(contexts):>8} {times[0] * 1e3:>15.1f} {times[1] * 1e3:>17.1f} "
              f"{total / (times[1] * 1e-3) / 1e9:>8.0f}", flush=True)


def bytes_moved(batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int,
                block_size: int, elem_size: int) -> int:
    """Compulsory traffic: every key and value once, the queries and outputs, the block tables."""
    kv = 2 * batch * context * num_kv_heads * head_dim * elem_size
    q_and_out = 2 * batch * num_heads * head_dim * elem_size
    tables = batch * -(-context // block_size) * 4
    return kv + q_and_out + tables


def parse_config(text: str) -> AttentionKernelConfig:
    """'16x64x4x3' -> block_m 16, block_n 64, 4 warps, 3 stages."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise SystemExit(f"--config must look like 16x64x4x3 (block_m x block_n x warps x stages); got {text!r}")
    block_m, block_n, num_warps, num_stages = map(int, parts)
    return AttentionKernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def format_config(config: AttentionKernelConfig) -> str:
    return f"{config.block_m}x{config.block_n}x{config.num_warps}x{config.num_stages}"


def time_ms(fn, use_graph: bool) -> float:
    if use_graph:
        # Decode runs under CUDA graphs in the engine; replay hides Python launch overhead.
        return triton.testing.do_bench_cudagraph(fn, rep=50)
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--no-graph", action="store_true", help="time eager launches instead of graph replay")
    parser.add_argument("--compare-splits", action="store_true", help="also time with split-KV forced off")
    parser.add_argument("--splits", type=int, nargs="+", default=None,
                        help="time these split-KV counts too (e.g. 1 2 4 8), to tune the split heuristic")
    parser.add_argument("--config", action="append", default=[], metavar="MxNxWARPSxSTAGES",
                        help="time these tile configs instead of the default choice (repeatable)")
    parser.add_argument("--gpu-thr-steps", type=int, nargs="+", default=None,
                        help="time gpu-thr's ragged decode batches at these decode steps instead")
    args = parser.parse_args()
    configs: list[AttentionKernelConfig | None] = [parse_config(c) for c in args.config] or [None]
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")

    dtype = getattr(torch, args.dtype)
    elem_size = torch.finfo(dtype).bits // 8
    scale = 1.0 / math.sqrt(args.head_dim)
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}  heads {args.num_heads}/{args.num_kv_heads}  head_dim {args.head_dim}  "
          f"block {args.block_size}  {args.dtype}  {'eager' if args.no_graph else 'cuda-graph replay'}")
    header = f"{'batch':>5} {'context':>7} {'config':>12} {'splits':>6} {'us':>9} {'GB/s':>8} {'% peak':>7}"
    if args.compare_splits:
        header += f" {'us(1 split)':>12} {'GB/s':>8}"
    for n in args.splits or []:
        header += f" {f'us({n} splits)':>13}"
    if args.gpu_thr_steps:
        bench_ragged(args, dtype, scale)
        return
    print(header)
    for batch in args.batches:
        for context in args.contexts:
            step = build_decode_step(batch, context, args.num_heads, args.num_kv_heads, args.head_dim,
                                     args.block_size, dtype)
            out = torch.empty_like(step["query"])
            call_args = [step[k] for k in ("query", "k_cache", "v_cache", "block_tables", "seq_lens",
                                           "query_start_loc")]
            splits = select_num_splits(device, batch, args.num_kv_heads, 1, context)
            total = bytes_moved(batch, context, args.num_heads, args.num_kv_heads, args.head_dim,
                                args.block_size, elem_size)

            for config in configs:
                def run(num_kv_splits: int | None = None) -> None:
                    paged_attention(*call_args, 1, context, scale, out=out, num_kv_splits=num_kv_splits,
                                    config=config)

                run()  # compile outside the timed region
                # The timers launch on their own stream: let the inputs' producers finish first.
                torch.cuda.synchronize()
                ms = time_ms(run, not args.no_graph)
                gbs = total / (ms * 1e-3) / 1e9
                label = "default" if config is None else format_config(config)
                line = (f"{batch:>5} {context:>7} {label:>12} {splits:>6} {ms * 1e3:>9.1f} {gbs:>8.0f} "
                        f"{100 * gbs * 1e9 / PEAK_BYTES_PER_S:>6.1f}%")
                if args.compare_splits:
                    run(1)
                    torch.cuda.synchronize()
                    ms1 = time_ms(lambda: run(1), not args.no_graph)
                    line += f" {ms1 * 1e3:>12.1f} {total / (ms1 * 1e-3) / 1e9:>8.0f}"
                for n in args.splits or []:
                    run(n)
                    torch.cuda.synchronize()
                    line += f" {time_ms(lambda: run(n), not args.no_graph) * 1e3:>13.1f}"
                print(line, flush=True)
            torch.cuda.synchronize()
            del step, call_args, out
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
