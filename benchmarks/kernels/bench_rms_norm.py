"""Times the fused residual-add + RMSNorm kernel per launch inside a CUDA graph, by row count, row
width and num_warps (the launch rule in kernels/triton/rms_norm.py came from this sweep).

    python benchmarks/kernels/bench_rms_norm.py [--cols 4096 1024] [--rows 1 16 256]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.testing

from pagellm.kernels.triton.rms_norm import _rms_norm_kernel

CHAIN = 20  # launches per graph replay: decode graphs chain small kernels back to back


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cols", type=int, nargs="+", default=[4096, 1024])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_rms_norm.py needs a CUDA GPU")
    print(f"{'rows':>5} {'cols':>5} {'warps':>5} {'us/launch':>10}")
    for cols in args.cols:
        block = triton.next_power_of_2(cols)
        weight = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
        for rows in args.rows:
            x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
            residual, out, residual_out = torch.randn_like(x), torch.empty_like(x), torch.empty_like(x)
            for warps in args.warps:
                def run() -> None:
                    for _ in range(CHAIN):
                        _rms_norm_kernel[(rows,)](x, residual, weight, out, residual_out, cols, cols, cols, cols,
                                                  cols, 1e-6, 0.0, HAS_RESIDUAL=True, BLOCK=block, num_warps=warps)
                run()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench_cudagraph(run, rep=100)
                print(f"{rows:>5} {cols:>5} {warps:>5} {ms * 1e3 / CHAIN:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
