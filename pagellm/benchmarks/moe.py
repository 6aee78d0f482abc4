"""Speed of one mixture-of-experts layer: the Triton grouped matmul against the per-expert torch loop.

`python -m pagellm.benchmarks.moe` times a Mixtral-8x7B-shaped layer (8 experts, top 2, hidden 4096,
expert width 14336, bf16) on the GPU for several token counts and prints one JSON line per count.
`--sweep` also times a few tile shapes of the Triton kernel.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 2048, 8192])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    import triton.testing

    from pagellm.kernels.triton.moe import grouped_moe_triton
    from pagellm.layers.activation import SiluAndMul
    from pagellm.layers.moe import grouped_moe_torch, route

    dtype = getattr(torch, args.dtype)
    e, k, h, i = args.experts, args.top_k, args.hidden, args.intermediate
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) / h ** 0.5).to(dtype)
    down = (torch.randn(e, h, i, device="cuda", generator=gen) / i ** 0.5).to(dtype)
    act = SiluAndMul()
    for t in args.tokens:
        x = torch.randn(t, h, device="cuda", generator=gen).to(dtype)
        weights, ids = route(torch.randn(t, e, device="cuda", generator=gen), k, renormalize=True)
        flops = 2 * t * k * 3 * h * i
        # Bytes of the experts that receive at least one token: the floor for small batches.
        used = int(torch.unique(ids).numel())
        weight_bytes = used * 3 * h * i * gate_up.element_size()
        triton_ms = triton.testing.do_bench(lambda: grouped_moe_triton(x, gate_up, down, weights, ids))
        torch_ms = triton.testing.do_bench(lambda: grouped_moe_torch(x, gate_up, down, weights, ids, act))
        ref = grouped_moe_torch(x.float(), gate_up.float(), down.float(), weights, ids, act)
        err = (grouped_moe_triton(x, gate_up, down, weights, ids).float() - ref).abs().max().item()
        row = dict(tokens=t, experts=e, top_k=k, hidden=h, intermediate=i, dtype=args.dtype,
                   triton_ms=round(triton_ms, 4), torch_loop_ms=round(torch_ms, 4),
                   triton_tflops=round(flops / triton_ms / 1e9, 1),
                   triton_weight_gbps=round(weight_bytes / triton_ms / 1e6, 1), max_abs_err_vs_fp32=err)
        if args.sweep:
            for bm, bn, bk in [(16, 64, 64), (32, 64, 64), (64, 64, 64), (64, 128, 64), (128, 128, 64)]:
                ms = triton.testing.do_bench(lambda: grouped_moe_triton(x, gate_up, down, weights, ids, bm, bn, bk))
                row[f"tile_{bm}x{bn}x{bk}_ms"] = round(ms, 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
