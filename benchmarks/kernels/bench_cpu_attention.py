"""Times the CPU decode-attention kernel (pagellm/kernels/cpu) against gather + SDPA, per layer.

A decode step of `--batch` sequences of `--context` keys each (SmolLM2 heads by default), blocks
shuffled over the pool; `--shared-blocks N` gives every sequence the same first N blocks (a
prefix-cache hit). Run alternately with an older build to compare kernels on a noisy machine.

    python benchmarks/kernels/bench_cpu_attention.py --batch 32 --context 1100
"""

from __future__ import annotations

import argparse
import time

import torch

from pagellm.kernels.cpu import decode_attention as cpu_decode
from pagellm.layers.attention.backend import AttentionMetadata
from pagellm.layers.attention.torch_backend import TorchAttentionBackend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=1100)
    p.add_argument("--num-heads", type=int, default=9)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--shared-blocks", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    s, ctx, bs = args.batch, args.context, args.block_size
    width = -(-ctx // bs)
    num_blocks = s * width + 1
    k = torch.randn(num_blocks, bs, args.num_kv_heads, args.head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, bs, args.num_kv_heads, args.head_dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[:s * width].view(s, width).to(torch.int32)
    tables[:, :args.shared_blocks] = tables[0, :args.shared_blocks].clone()
    lens = torch.full((s,), ctx, dtype=torch.int32)
    q = torch.randn(s, args.num_heads, args.head_dim, generator=g).to(dtype)
    scale = args.head_dim ** -0.5

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()
        return (time.perf_counter() - start) / args.iters * 1e3

    kv_bytes = 2 * s * ctx * args.num_kv_heads * args.head_dim * k.element_size()
    if cpu_decode.supports(q, k):
        ms = timed(lambda: cpu_decode.paged_decode_attention(q, k, v, tables, lens, scale))
        print(f"C kernel:      {ms:7.2f} ms per layer ({kv_bytes / ms / 1e6:5.1f} GB/s of K/V)")
    else:
        print("C kernel: not available here (no C compiler, or shapes it does not take)")
    backend = TorchAttentionBackend()
    meta = AttentionMetadata(
        slot_mapping=torch.full((s,), -1), query_start_loc=torch.arange(s + 1, dtype=torch.int32),
        seq_lens=lens, block_tables=tables, max_query_len=1, max_seq_len=ctx, num_decodes=s,
        num_decode_tokens=s, query_lens_cpu=[1] * s, seq_lens_cpu=[ctx] * s)
    supports = cpu_decode.supports
    cpu_decode.supports = lambda *a: False  # the gather + SDPA path
    try:
        ms = timed(lambda: backend.forward(q, None, None, k, v, meta, scale, kv_written=True))
    finally:
        cpu_decode.supports = supports
    print(f"gather + SDPA: {ms:7.2f} ms per layer (plan shared across calls, as across a step's layers)")


if __name__ == "__main__":
    main()
