"""Times decode-batch GEMMs: cuBLAS (F.linear) against the Triton skinny kernel's configs, on the GPU.

Each figure is the mean time of one product inside a CUDA graph that runs it over enough distinct
weight copies (>= 512 MB) that nothing is served from L2, as in a decode step where every weight is
read once. Reports microseconds and the weight bandwidth reached (against 4.24 TB/s copy).

    python benchmarks/kernels/bench_gemm.py --model llama-8b --rows 1 8 16
    python benchmarks/kernels/bench_gemm.py --model qwen3-0.6b --rows 1 16 --step   # + a whole step's GEMMs
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from pagellm.kernels.triton.activation import silu_and_mul
from pagellm.kernels.triton.skinny_gemm import SkinnyGemmConfig, select_config, skinny_gemm

# name -> [(label, N, K, gated)] of one layer's projections, then the LM head (once per step).
SHAPES = {
    "llama-8b": dict(layers=32, gemms=[("qkv", 6144, 4096, False), ("o", 4096, 4096, False),
                                       ("gate_up", 28672, 4096, False), ("down", 4096, 14336, True)],
                     head=("lm_head", 128256, 4096, False),
                     # Only with --only: down_proj on an input already activated (SiLU-and-mul done before).
                     extra=[("down_act", 4096, 14336, False)]),
    "qwen3-0.6b": dict(layers=28, gemms=[("qkv", 4096, 1024, False), ("o", 1024, 2048, False),
                                         ("gate_up", 6144, 1024, False), ("down", 1024, 3072, True)],
                       head=("lm_head", 151936, 1024, False),
                       extra=[("down_act", 1024, 3072, False)]),
}
MIN_BYTES = 512 << 20


def candidate_configs(rows: int, wide: bool = False) -> list[SkinnyGemmConfig]:
    configs = []
    if wide and rows <= 16:
        # Tensor-core tiles only, over strip width, K step, pipeline depth and split-K.
        for bn, bk, stages, split in itertools.product((16, 32, 64), (128, 256), (3, 4, 5), (1, 2, 4, 8)):
            configs.append(SkinnyGemmConfig(16, bn, bk, 4, stages, split))
        return configs
    if rows == 1:
        for bn, bk, w, split in itertools.product((16, 32), (256, 512), (4, 8), (1, 2, 4, 8)):
            configs.append(SkinnyGemmConfig(1, bn, bk, w, 1, split))
        # The FMA path software-pipelined (shorter K steps so the stages fit in shared memory).
        for bn, bk, stages, split in itertools.product((16, 32, 64), (64, 128), (2, 3), (1, 2, 4)):
            configs.append(SkinnyGemmConfig(1, bn, bk, 4, stages, split))
    if rows <= 16:
        for bn, bk, split in itertools.product((32, 64), (128, 256), (1, 2, 4)):
            configs.append(SkinnyGemmConfig(16, bn, bk, 4, 4, split))
        return configs
    for bm, bn, bk, s in itertools.product((32, 64, 128), (32, 64, 128), (64, 128), (3, 4)):
        if bm * bn <= 64 * 128:
            configs.append(SkinnyGemmConfig(bm, bn, bk, 4, s))
    return configs


def graph_time_us(fn, copies: int, reps: int = 10) -> float:
    """Mean microseconds per call of fn(i) for i in range(copies), replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * copies)


def bench_shape(n: int, k: int, gated: bool, rows: int, configs: list[SkinnyGemmConfig], dtype,
                keep_tensor_core: bool = False) -> list:
    copies = max(2, -(-MIN_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, 2 * k if gated else k, device="cuda", dtype=dtype)
    x_plain = x[:, :k].contiguous() if gated else x
    ref = F.linear(x_plain, weights[0]) if not gated else None
    results = [("cublas", graph_time_us(lambda i: F.linear(x_plain, weights[i]), copies))]
    if gated:
        gate, up = x.float().chunk(2, dim=-1)
        act = (F.silu(gate).to(dtype).float() * up).to(dtype)
        ref = F.linear(act, weights[0])
        results[0] = ("cublas+silu", graph_time_us(lambda i: F.linear(silu_and_mul(x), weights[i]), copies))
        act_in = silu_and_mul(x)
        print(f"  cublas alone (SiLU done before): {graph_time_us(lambda i: F.linear(act_in, weights[i]), copies):.1f} us")
    if gated and not keep_tensor_core:
        # Every program re-reads (and re-activates) all of x: only one row on the FMA path pays.
        configs = [c for c in configs if c.block_m == 1]
    for config in configs:
        try:
            y = skinny_gemm(x, weights[0], config=config, gated=gated)
            err = (y.float() - ref.float()).abs().max().item()
            if err > 0.05 * ref.float().abs().max().item() + 1e-2:
                results.append((str(config), float("nan")))
                print(f"  WRONG {config}: max error {err}")
                continue
            results.append((str(config), graph_time_us(
                lambda i: skinny_gemm(x, weights[i], config=config, gated=gated), copies)))
        except Exception as e:  # a config Triton cannot build (shared memory, registers)
            print(f"  skip {config}: {type(e).__name__}: {str(e)[:100]}")
    del weights
    torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--top", type=int, default=3, help="configs listed per shape")
    parser.add_argument("--only", nargs="+", default=None,
                        help="projections to time (qkv o gate_up down lm_head; down_act only when named)")
    parser.add_argument("--wide", action="store_true", help="sweep the tensor-core tiles more widely (also gated)")
    parser.add_argument("--config", type=SkinnyGemmConfig.parse, action="append", default=None,
                        help="time these configs instead of the sweep (repeatable; e.g. 16x64x128w4s4)")
    args = parser.parse_args()
    dtype = torch.bfloat16
    spec = SHAPES[args.model]
    summary = []
    # The step's products unless --only names some (the extra shapes only then).
    wanted = args.only or [g[0] for g in spec["gemms"]] + [spec["head"][0]]
    for rows in args.rows:
        configs = args.config or candidate_configs(rows, args.wide)
        for label, n, k, gated in spec["gemms"] + [spec["head"]] + spec["extra"]:
            if label not in wanted:
                continue
            # Gated products keep tensor-core tiles in the wide sweep and when named with --config.
            results = bench_shape(n, k, gated, rows, configs, dtype, args.wide or bool(args.config))
            base_name, base = results[0]
            ranked = sorted((r for r in results[1:] if r[1] == r[1]), key=lambda r: r[1])
            chosen = select_config(rows, n, k, torch.device("cuda"), gated=gated)
            chosen_time = dict(results).get(str(chosen), float("nan"))
            gb = n * k * 2 / 1e9
            print(f"M={rows} {label} [{n}x{k}]: {base_name} {base:.1f} us ({gb / base * 1e6 / 1e3:.2f} TB/s)")
            for name, t in ranked[:args.top]:
                print(f"    {name:>18s} {t:8.1f} us ({gb / t * 1e6 / 1e3:.2f} TB/s)")
            print(f"    selected {chosen}: {chosen_time:.1f} us")
            summary.append((rows, label, n, k, base, ranked[0] if ranked else ("-", float("nan")), chosen, chosen_time))
    print("\nrows  gemm      cublas_us  best_us  best_config          selected_us  selected")
    layers = spec["layers"]
    for rows in args.rows:
        totals = [0.0, 0.0, 0.0]
        for r, label, n, k, base, (best_name, best), chosen, chosen_time in summary:
            if r != rows:
                continue
            print(f"{rows:4d}  {label:8s} {base:10.1f} {best:8.1f}  {best_name:20s} {chosen_time:10.1f}  {chosen}")
            times = (base, best, chosen_time)
            mult = 1 if label == "lm_head" else layers
            for i in range(3):
                totals[i] += mult * times[i]
        print(f"{rows:4d}  step GEMMs (x{layers} layers + head): cublas {totals[0] / 1e3:.3f} ms, "
              f"best {totals[1] / 1e3:.3f} ms, selected {totals[2] / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
