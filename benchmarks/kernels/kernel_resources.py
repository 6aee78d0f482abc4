"""Registers, spills and shared memory of the paged-attention and skinny-GEMM kernels, compiled
offline for an H200 (sm_90) by the local Triton and its bundled ptxas: no GPU needed. Occupancy
follows from them (65,536 registers and 228 KB of shared memory per SM). The device runs another
Triton version, so take the figures as indicative; a change that adds registers or spills shows
here before any device run.

    python benchmarks/kernels/kernel_resources.py               # attention tiles, Qwen3 heads
    python benchmarks/kernels/kernel_resources.py --group 4     # Llama-8B heads
    python benchmarks/kernels/kernel_resources.py --skinny      # the decode GEMMs of Llama-8B at one row
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default (the device's); silences 3.9's warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pagellm.kernels.triton import paged_attention as pa  # noqa: E402
from pagellm.kernels.triton import skinny_gemm as sg  # noqa: E402

_ATTENTION_POINTERS = {
    "out_ptr": "*bf16", "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "query_ptr": "*bf16",
    "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
    "query_start_loc_ptr": "*i32", "seq_order_ptr": "*i32"}
# What a real launch specializes as divisible by 16 (bf16 caches [blocks, 16, Hkv, 128], fused qkv views).
_ATTENTION_DIVISIBLE = set(_ATTENTION_POINTERS) | {
    "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks", "stride_kh", "stride_vb",
    "stride_vs", "stride_vh", "num_heads"}
_SKINNY_POINTERS = {
    "x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16", "partial_ptr": "*fp32",
    "arrivals_ptr": "*i32", "positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "k_cache_ptr": "*bf16",
    "v_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64"}
_SKINNY_DIVISIBLE = set(_SKINNY_POINTERS) | {
    "N", "K", "stride_xm", "stride_wn", "stride_om", "stride_cs", "stride_cache_block", "stride_cache_slot",
    "stride_cache_head"}
# Llama-3.1-8B's decode products: (label, N, K, gated), as in benchmarks/kernels/bench_gemm.py.
_LLAMA_8B_GEMMS = (("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("down", 4096, 14336, True),
                   ("lm_head", 128256, 4096, False))


def resources(fn, pointers: dict, divisible: set, constants: dict, num_warps: int, num_stages: int) -> str:
    """cuobjdump's resource line for `fn` compiled with these constexprs; other arguments are
    `pointers`' types, or fp32 for `scale` / `soft_cap`, or i32, divisible by 16 where `divisible` says."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name]
            continue
        signature[name] = pointers.get(name, "fp32" if name in ("scale", "soft_cap") else "i32")
        if name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next((l.strip() for l in out.splitlines() if "REG:" in l), out.strip())
    return f"{line.split(' TEXTURE')[0]}, shared {kernel.metadata.shared} B"


def attention_report(group: int, head_dim: int) -> None:
    for label, max_query_len, decode in (("decode", 1, 2), ("prefill", 2048, 0)):
        # The tiles the engine picks on a CUDA device (the rule reads only the device's type).
        config = pa.select_config(torch.device("cuda"), head_dim, group, max_query_len)
        constants = dict(GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
                         PAGE_SIZE=16, BLOCK_M=config.block_m, BLOCK_Q=config.block_m // group,
                         BLOCK_N=config.block_n, NUM_SPLITS=1, DECODE=decode, USE_WINDOW=False, USE_SOFT_CAP=False,
                         DOT_PRECISION="tf32", DOT_IN_FP32=False, USE_PDL=True)
        print(f"{label} {config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}: "
              f"{resources(pa._paged_attention_kernel, _ATTENTION_POINTERS, _ATTENTION_DIVISIBLE, constants, config.num_warps, config.num_stages)}")


def skinny_report() -> None:
    for label, n, k, gated in _LLAMA_8B_GEMMS:
        # select_config's choice at one row on a CUDA device; qkv takes the RoPE + cache epilogue.
        config = sg.select_config(1, n, k, torch.device("cuda"), gated=gated)
        if config is None:
            print(f"{label} [{n}x{k}]: cuBLAS")
            continue
        constants = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                         SPLIT_K=config.split_k, PARTIAL_ROWS=sg.MAX_SKINNY_ROWS, EVEN_K=k % config.block_k == 0,
                         GATED=gated, GATED_ONE_ROW=gated and config.block_m > 1, HAS_BIAS=False,
                         USE_DOT=config.block_m > 1, DOT_PRECISION="tf32",
                         DOT_IN_FP32=False, ROPE_HALF=64 if label == "qkv" else 0, WRITE_CACHE=label == "qkv",
                         PAGE_SIZE=16, USE_PDL=True)
        programs = triton.cdiv(n, config.block_n) * config.split_k
        print(f"{label} [{n}x{k}] {config}, {programs} programs: "
              f"{resources(sg._skinny_gemm_kernel, _SKINNY_POINTERS, _SKINNY_DIVISIBLE, constants, config.num_warps, config.num_stages)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", type=int, default=2, help="query heads per KV head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--skinny", action="store_true", help="the skinny-GEMM configs of Llama-8B's decode at one row")
    args = p.parse_args()
    if args.skinny:
        skinny_report()
    else:
        attention_report(args.group, args.head_dim)


if __name__ == "__main__":
    main()
