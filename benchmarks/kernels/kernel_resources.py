"""Registers, spills and shared memory of the paged-attention kernel, compiled offline for an H200
(sm_90) by the local Triton and its bundled ptxas: no GPU needed. Occupancy follows from them (65,536
registers and 228 KB of shared memory per SM). The device runs another Triton version, so take the
figures as indicative; a change that adds registers or spills shows here before any device run.

    python benchmarks/kernels/kernel_resources.py               # decode and prefill tiles, Qwen3 heads
    python benchmarks/kernels/kernel_resources.py --group 4     # Llama-8B heads
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

_POINTERS = {"out_ptr": "*bf16", "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "query_ptr": "*bf16",
             "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
             "query_start_loc_ptr": "*i32", "seq_order_ptr": "*i32"}
_FLOATS = {"scale", "soft_cap"}
# What a real launch specializes as divisible by 16 (bf16 caches [blocks, 16, Hkv, 128], fused qkv views).
_DIVISIBLE = set(_POINTERS) | {"stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks",
                               "stride_kh", "stride_vb", "stride_vs", "stride_vh", "num_heads"}


def resources(constants: dict, num_warps: int, num_stages: int) -> str:
    """cuobjdump's resource line for the kernel compiled with these constexprs."""
    fn = pa._paged_attention_kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name]
            continue
        signature[name] = _POINTERS.get(name, "fp32" if name in _FLOATS else "i32")
        if name in _DIVISIBLE:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", type=int, default=2, help="query heads per KV head")
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    for label, max_query_len, decode in (("decode", 1, 2), ("prefill", 2048, 0)):
        # The tiles the engine picks on a CUDA device (the rule reads only the device's type).
        config = pa.select_config(torch.device("cuda"), args.head_dim, args.group, max_query_len)
        head_pad = max(16, triton.next_power_of_2(args.head_dim))
        constants = dict(GROUP=args.group, HEAD_DIM=args.head_dim, HEAD_DIM_PAD=head_pad, PAGE_SIZE=16,
                         BLOCK_M=config.block_m, BLOCK_Q=config.block_m // args.group, BLOCK_N=config.block_n,
                         NUM_SPLITS=1, DECODE=decode, USE_WINDOW=False, USE_SOFT_CAP=False,
                         DOT_PRECISION="tf32", DOT_IN_FP32=False, USE_PDL=False)
        print(f"{label} {config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}: "
              f"{resources(constants, config.num_warps, config.num_stages)}")


if __name__ == "__main__":
    main()
