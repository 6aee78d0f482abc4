"""Times Triton paged attention on gpu-thr's mixed steps: a 16k-token prefill chunk plus decodes.

Compares one launch for the whole step against the Triton backend's two (the decodes with the
decode kernel's small row tiles, then the prefill chunks), and sweeps the prefill launch's tiles.
TFLOP/s counts the useful work only (causal QK^T and PV). Run on a CUDA machine:

    python benchmarks/kernels/bench_mixed_attention.py --decodes 0 100 200
    python benchmarks/kernels/bench_mixed_attention.py --config 128x64x8x2 --config 64x64x4x2
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from pagellm.benchmarks.workloads import standard_workload
from pagellm.kernels.triton.paged_attention import AttentionKernelConfig, paged_attention


def build_mixed_step(num_decodes: int, chunk_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                     block_size: int = 16, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Decodes over gpu-thr-like contexts first, then fresh gpu-thr prompts filling `chunk_tokens`."""
    prompts = [len(p) for p in standard_workload("gpu-thr").prompts]
    gen = torch.Generator().manual_seed(0)
    decode_ctx = [prompts[i % len(prompts)] + int(torch.randint(1, 100, (1,), generator=gen)) for i in range(num_decodes)]
    chunks, left = [], chunk_tokens - num_decodes
    for n in prompts[::-1]:
        if left <= 0:
            break
        chunks.append(min(n, left))
        left -= chunks[-1]
    query_lens = [1] * num_decodes + chunks
    seq_lens = decode_ctx + chunks
    blocks = [-(-n // block_size) for n in seq_lens]
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    perm = torch.randperm(sum(blocks), generator=gen).to(torch.int32)
    start = 0
    for s, nb in enumerate(blocks):
        table[s, :nb] = perm[start:start + nb]
        start += nb
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    cache_shape = (sum(blocks), block_size, num_kv_heads, head_dim)
    return dict(query=torch.randn(sum(query_lens), num_heads, head_dim, device="cuda", dtype=dtype),
                k_cache=torch.randn(cache_shape, device="cuda", dtype=dtype),
                v_cache=torch.randn(cache_shape, device="cuda", dtype=dtype),
                block_tables=table.cuda(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                query_start_loc=qsl.cuda(), num_decodes=num_decodes, max_query_len=max(query_lens),
                max_seq_len=max(seq_lens), flops=_useful_flops(query_lens, seq_lens, num_heads, head_dim))


def _useful_flops(query_lens: list[int], seq_lens: list[int], num_heads: int, head_dim: int) -> float:
    # Query i of a q-token chunk over an n-key sequence sees n - q + i + 1 keys; 2 matmuls x 2 FLOP.
    keys = sum(q * (n - q) + q * (q + 1) / 2 for q, n in zip(query_lens, seq_lens))
    return 4.0 * keys * num_heads * head_dim


def parse_config(text: str) -> AttentionKernelConfig:
    block_m, block_n, num_warps, num_stages = map(int, text.lower().split("x"))
    return AttentionKernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decodes", type=int, nargs="+", default=[0, 60, 120, 200])
    parser.add_argument("--chunk-tokens", type=int, default=16384)
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--config", action="append", default=[], metavar="MxNxWARPSxSTAGES",
                        help="prefill-launch tiles to time besides the default")
    args = parser.parse_args()
    configs = [None] + [parse_config(c) for c in args.config]
    scale = args.head_dim ** -0.5
    print(f"{'decodes':>7} {'variant':>22} {'ms':>8} {'TFLOP/s':>8}")
    for nd in args.decodes:
        st = build_mixed_step(nd, args.chunk_tokens, args.num_heads, args.num_kv_heads, args.head_dim)
        q, kc, vc = st["query"], st["k_cache"], st["v_cache"]
        bt, sl, qsl = st["block_tables"], st["seq_lens"], st["query_start_loc"]
        out = torch.empty_like(q)

        def one_launch() -> None:
            paged_attention(q, kc, vc, bt, sl, qsl, st["max_query_len"], st["max_seq_len"], scale, out=out)

        def two_launches(config: AttentionKernelConfig | None) -> None:
            # As the Triton backend does it (layers/attention/triton_backend.py).
            if nd:
                paged_attention(q[:nd], kc, vc, bt[:nd], sl[:nd], qsl[:nd + 1], 1, st["max_seq_len"], scale,
                                out=out[:nd], num_kv_splits=1)
            paged_attention(q, kc, vc, bt, sl, qsl, st["max_query_len"], st["max_seq_len"], scale,
                            out=out, config=config, first_seq=nd)

        one_launch()
        expected = out.clone()
        variants = [("one launch", one_launch)]
        variants += [(f"two, {'default' if c is None else 'x'.join(map(str, (c.block_m, c.block_n, c.num_warps, c.num_stages)))}",
                      lambda c=c: two_launches(c)) for c in configs]
        for name, fn in variants:
            out.zero_()
            fn()
            err = (out.float() - expected.float()).abs().max().item()
            ms = triton.testing.do_bench(fn, warmup=10, rep=100)
            print(f"{nd:>7} {name:>22} {ms:>8.2f} {st['flops'] / ms / 1e9:>8.0f}" + (f"  max|diff| {err:.3g}" if err > 2e-2 else ""),
                  flush=True)


if __name__ == "__main__":
    main()
