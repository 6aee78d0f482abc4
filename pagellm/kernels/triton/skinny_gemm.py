"""Triton matmul for decode-sized batches: y [M, N] = x [M, K] @ W[N, K]^T (+ bias), M small.

A decode step's GEMMs read every weight once for a handful of rows, so they are bound by weight
bandwidth and by how many SMs have work. cuBLAS picks large tiles meant for big M; here a program
owns a narrow strip of BLOCK_N weight rows for BLOCK_M rows of x and streams its K range through a
software pipeline (num_stages), so even a 4096-wide output spreads over every SM.

- USE_DOT: the strip is multiplied on tensor cores (x padded to BLOCK_M >= 16 rows); without it
  (BLOCK_M == 1, a single row) the products accumulate as fp32 FMAs and reduce once at the end.
- GATED: x is [M, 2K] = [gate | up] and the kernel reads silu(gate) * up as its input, so a
  gated MLP's down projection needs no separate activation kernel (rounded as SiluAndMul rounds).
- SPLIT_K: narrow outputs (few strips) also cut K into slices; each program parks its slice's sum
  in a workspace and the last to arrive for a tile adds them in order (deterministic, one launch).
- ROPE_HALF (skinny_gemm_rope): the product is an attention layer's fused qkv. A program's strip is
  two half-strips of one head, columns d and d + head_dim / 2, so its epilogue holds both halves of
  each rotation pair: it applies RoPE to q and k heads and stores the step's K and V in the paged
  cache, as kernels/triton/rotary.py would in a second launch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagellm.kernels.triton.launch_config import check_tiles
from pagellm.kernels.triton.pdl import pdl_options, release_dependents, wait_for_inputs

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest batch the skinny kernel takes; above it cuBLAS's large tiles win.
MAX_SKINNY_ROWS = 16
_ENABLED = os.environ.get("PAGELLM_SKINNY_GEMM", "1") != "0"


@dataclass(frozen=True)
class SkinnyGemmConfig:
    """Tiles and launch options. block_m 1 selects the FMA path (one row of x), else tensor cores."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # programs sharing one output tile, each over a slice of K; the last one adds them

    def __post_init__(self) -> None:
        if self.block_m != 1 and (self.block_m < 16 or self.block_m & (self.block_m - 1)):
            raise ValueError(f"block_m must be 1 or a power of two >= 16; got {self.block_m}")
        check_tiles(self, ("block_n", "block_k"))
        if self.split_k not in (1, 2, 4, 8, 16):
            raise ValueError(f"split_k must be one of 1, 2, 4, 8, 16; got {self.split_k}")
        if self.split_k > 1 and self.block_m > MAX_SKINNY_ROWS:
            raise ValueError(f"split_k > 1 needs block_m <= {MAX_SKINNY_ROWS}; got {self.block_m}")

    def __str__(self) -> str:
        text = f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"
        return text + (f"k{self.split_k}" if self.split_k > 1 else "")

    @classmethod
    def parse(cls, text: str) -> SkinnyGemmConfig:
        """The config that str() prints as `text`, e.g. 16x64x128w4s4 or 1x32x512w4s1k2 (k: split-K)."""
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)(?:k(\d+))?", text.strip())
        if match is None:
            raise ValueError(f"not a skinny-GEMM config like 16x64x128w4s4 or 1x32x512w4s1k2: {text!r}")
        bm, bn, bk, warps, stages, split = (int(g) if g else 1 for g in match.groups())
        return cls(bm, bn, bk, warps, stages, split)


def parse_tile_overrides(text: str) -> dict[tuple[int, int], SkinnyGemmConfig]:
    """PAGELLM_SKINNY_TILES' format: comma-separated NxK=config entries, e.g.
    "6144x4096=16x64x256w4s6,4096x4096=16x32x256w4s9" -> {(6144, 4096): ..., (4096, 4096): ...}."""
    overrides = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        shape, sep, config = entry.partition("=")
        match = re.fullmatch(r"(\d+)x(\d+)", shape.strip())
        if not sep or match is None:
            raise ValueError(f"PAGELLM_SKINNY_TILES entries are NxK=config (e.g. 4096x4096=16x32x256w4s5); got {entry!r}")
        overrides[(int(match[1]), int(match[2]))] = SkinnyGemmConfig.parse(config)
    return overrides


# Tiles for given weight shapes [N, K] instead of select_config's rules, for tuning on a new GPU
# without editing them: PAGELLM_SKINNY_TILES="6144x4096=16x64x256w4s6,...". Read once, at import.
# A SiLU-gated product of a listed shape takes the tiles at one row; at more rows it runs as
# SiluAndMul, then the listed plain product.
_TILE_OVERRIDES = parse_tile_overrides(os.environ.get("PAGELLM_SKINNY_TILES", ""))


@triton.jit
def _silu_and_mul(gate, up):
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # SiLU rounded to the model's dtype first
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _in_row_zero(v, BLOCK_M: tl.constexpr):
    # [BM, BK] tensor-core tile holding one row of input: v [BK] in row 0, zeros in the padding rows.
    return tl.where((tl.arange(0, BLOCK_M) == 0)[:, None], v[None, :], 0.0).to(v.dtype)


@triton.jit
def _load_input(x_rows, x_ptr, ks, mask, K, GATED: tl.constexpr, ONE_ROW: tl.constexpr):
    # [BM, BK] tile of the kernel's input: x itself, or silu(gate) * up from [gate | up]. ONE_ROW
    # (a gated tile of one row of x, padded for tensor cores): the activation of row 0 only, the
    # padding rows zeros, instead of BM rows of SiLU.
    if GATED and ONE_ROW:
        k_valid = ks < K                                                              # [BK]
        act = _silu_and_mul(tl.load(x_ptr + ks, mask=k_valid, other=0.0),
                            tl.load(x_ptr + K + ks, mask=k_valid, other=0.0))        # [BK]
        return _in_row_zero(act, x_rows.shape[0])
    if GATED:
        return _silu_and_mul(tl.load(x_rows + ks[None, :], mask=mask, other=0.0),
                             tl.load(x_rows + K + ks[None, :], mask=mask, other=0.0))
    return tl.load(x_rows + ks[None, :], mask=mask, other=0.0)


# M varies with the batch: unspecialized so a batch of 1 or 16 does not compile a variant.
@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_cs, stride_cache_block, stride_cache_slot, stride_cache_head, num_q_heads, num_kv_heads,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PARTIAL_ROWS: tl.constexpr,
    EVEN_K: tl.constexpr, GATED: tl.constexpr, GATED_ONE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ROPE_HALF: tl.constexpr, WRITE_CACHE: tl.constexpr, PAGE_SIZE: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_inputs(USE_PDL)  # x, and every buffer written below, belong to earlier kernels
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                 # [BM]
    if ROPE_HALF > 0:
        # Half-strip i // W of head `head`: columns j * W + i % W, then the same + ROPE_HALF.
        W: tl.constexpr = BLOCK_N // 2
        head = pid_n // (ROPE_HALF // W)
        i = tl.arange(0, BLOCK_N)
        head_col = (pid_n % (ROPE_HALF // W)) * W + i % W + (i // W) * ROPE_HALF    # [BN] column in the head
        offs_n = head * (2 * ROPE_HALF) + head_col                                  # [BN]
    else:
        head = 0
        head_col = tl.arange(0, BLOCK_N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)             # [BN]
    offs_k = tl.arange(0, BLOCK_K)                                   # [BK]
    m_valid = offs_m < M
    n_valid = offs_n < N
    # Rows past N re-read row 0 (always valid) instead of masking: loads stay unpredicated.
    safe_n = tl.where(n_valid, offs_n, 0)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm        # [BM, 1]
    w_rows = w_ptr + safe_n[:, None].to(tl.int64) * stride_wn        # [BN, 1]
    # This program's slice of K: whole BLOCK_K steps, so an even K stays unmasked.
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k                                             # [BK]
        if EVEN_K:
            w = tl.load(w_rows + ks[None, :])                                          # [BN, BK]
            a = _load_input(x_rows, x_ptr, ks, m_valid[:, None], K, GATED, GATED_ONE_ROW)  # [BM, BK]
        else:
            k_valid = ks < K
            w = tl.load(w_rows + ks[None, :], mask=k_valid[None, :], other=0.0)
            a = _load_input(x_rows, x_ptr, ks, m_valid[:, None] & k_valid[None, :], K, GATED, GATED_ONE_ROW)
        if USE_DOT:
            if DOT_IN_FP32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)         # [BM, BN]
        else:
            acc += w.to(tl.float32) * a.to(tl.float32)                                # [BN, BK]
    release_dependents(USE_PDL)  # only the epilogue is left
    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=1)[None, :]                                            # [1, BN]
    store_mask = m_valid[:, None] & n_valid[None, :]
    if SPLIT_K > 1:
        # Serial split-K: park this slice's sum, count arrivals per output tile; the last program
        # to arrive adds the slices in split order (deterministic) and resets the counter to 0.
        partial_rows = offs_m[:, None] * N + offs_n[None, :]                            # [BM, BN]
        tl.store(partial_ptr + pid_k * PARTIAL_ROWS * N + partial_rows, out, mask=store_mask)
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            out = tl.zeros(out.shape, dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                out += tl.load(partial_ptr + split * PARTIAL_ROWS * N + partial_rows, mask=store_mask,
                               other=0.0, cache_modifier=".cg")
            _epilogue(out, offs_m, offs_n, m_valid, n_valid, store_mask, safe_n, bias_ptr, out_ptr, stride_om,
                      head, head_col, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                      stride_cs, stride_cache_block, stride_cache_slot, stride_cache_head, num_q_heads,
                      num_kv_heads, BLOCK_N, HAS_BIAS, ROPE_HALF, WRITE_CACHE, PAGE_SIZE)
            tl.atomic_xchg(arrivals_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        _epilogue(out, offs_m, offs_n, m_valid, n_valid, store_mask, safe_n, bias_ptr, out_ptr, stride_om,
                  head, head_col, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                  stride_cs, stride_cache_block, stride_cache_slot, stride_cache_head, num_q_heads,
                  num_kv_heads, BLOCK_N, HAS_BIAS, ROPE_HALF, WRITE_CACHE, PAGE_SIZE)


@triton.jit
def _epilogue(out, offs_m, offs_n, m_valid, n_valid, store_mask, safe_n, bias_ptr, out_ptr, stride_om,
              head, head_col, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
              stride_cs, stride_cache_block, stride_cache_slot, stride_cache_head, num_q_heads, num_kv_heads,
              BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ROPE_HALF: tl.constexpr,
              WRITE_CACHE: tl.constexpr, PAGE_SIZE: tl.constexpr):
    # out [BM, BN] fp32: bias, then (qkv) RoPE and the cache stores, then the output tile.
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        out += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    if ROPE_HALF > 0:
        W: tl.constexpr = BLOCK_N // 2
        BM: tl.constexpr = out.shape[0]
        # Rounded to the model's dtype first, as the unfused path stores qkv before rotating it.
        x = out.to(dtype).to(tl.float32)
        num_rotated = num_q_heads + num_kv_heads
        if head < num_rotated:
            # partner: each column's rotation partner (the other half-strip), sign: -1 on the first half.
            a, b = tl.split(tl.permute(tl.reshape(x, [BM, 2, W]), (0, 2, 1)))            # [BM, W] each
            partner = tl.reshape(tl.permute(tl.join(b, a), (0, 2, 1)), [BM, BLOCK_N])
            sign = tl.where(tl.arange(0, BLOCK_N) < W, -1.0, 1.0)                       # [BN]
            pos = tl.load(positions_ptr + offs_m, mask=m_valid, other=0).to(tl.int64)   # [BM]
            cs = cos_sin_ptr + pos[:, None] * stride_cs + head_col[None, :]             # cos row, then sin
            cos = tl.load(cs, mask=m_valid[:, None], other=0.0).to(dtype).to(tl.float32)
            sin = tl.load(cs + 2 * ROPE_HALF, mask=m_valid[:, None], other=0.0).to(dtype).to(tl.float32)
            x = x * cos + (sign[None, :] * partner) * sin
        y = x.to(dtype)
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], y, mask=store_mask)
        if WRITE_CACHE:
            if head >= num_q_heads:
                slot = tl.load(slot_mapping_ptr + offs_m, mask=m_valid, other=-1).to(tl.int64)   # [BM]
                is_k = head < num_rotated
                kv_head = tl.where(is_k, head - num_q_heads, head - num_rotated)
                dst = ((slot // PAGE_SIZE) * stride_cache_block + (slot % PAGE_SIZE) * stride_cache_slot
                       + kv_head * stride_cache_head)[:, None] + head_col[None, :]           # [BM, BN]
                cache_mask = store_mask & (slot >= 0)[:, None]  # slot -1: a padding row
                if is_k:
                    tl.store(k_cache_ptr + dst, y, mask=cache_mask)
                else:
                    tl.store(v_cache_ptr + dst, y, mask=cache_mask)
    else:
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], out.to(dtype), mask=store_mask)


_workspaces: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _split_k_workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials [16 splits, MAX_SKINNY_ROWS, n] fp32, arrival counters [n] int32 zeros) for outputs n wide.

    Allocated once per width and shared by every layer of that width: the kernels run one after
    another on the stream, and each leaves the counters at zero.
    """
    key = (device, n)
    if key not in _workspaces:
        _workspaces[key] = (torch.empty(16, MAX_SKINNY_ROWS, n, dtype=torch.float32, device=device),
                            torch.zeros(n, dtype=torch.int32, device=device))
    return _workspaces[key]


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                config: SkinnyGemmConfig, gated: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (or [M, 2K] = [gate | up] when `gated`) @ weight [N, K]^T (+ bias [N]) -> [M, N],
    written into `out` when given ([M, N] of x's dtype, contiguous last dimension).

    x, weight and bias share one dtype; last dimensions contiguous. With `gated` the input is
    silu(gate) * up, each rounded to the dtype as SiluAndMul rounds it. No host-device sync.
    """
    _check_inputs(x, weight, bias, config, gated)
    num_rows, n = x.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    elif out.shape != (num_rows, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be [{num_rows}, {n}] {x.dtype} with a contiguous last dimension; "
                         f"got {tuple(out.shape)} {out.dtype}")
    _launch(x, weight, bias, out, config, gated)
    return out


def skinny_gemm_rope(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, config: SkinnyGemmConfig,
                     num_q_heads: int, num_kv_heads: int, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                     kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """An attention layer's qkv projection with RoPE in its epilogue: x [M, K] @ weight [N, K]^T
    (+ bias), N = (num_q_heads + 2 * num_kv_heads) * D, returned [M, N] with the q and k heads
    rotated (non-interleaved layout, the whole head; cos_sin_cache [P, 2, D] fp32 as
    kernels/triton/rotary.py takes it, positions [M]). With `kv_cache` = (k_cache, v_cache,
    slot_mapping [M]) the rotated keys and the values also land in the paged cache (slots < 0
    skipped). Equals F.linear + qk_norm_rope_ (no q/k norm) up to fp32 rounding order.
    Needs config.block_n // 2 to divide D // 2 (see rope_config)."""
    from pagellm.kernels.triton.rotary import validate_kv_cache
    _check_inputs(x, weight, bias, config, False)
    num_rows, n = x.shape[0], weight.shape[0]
    heads = num_q_heads + 2 * num_kv_heads
    if num_q_heads < 1 or num_kv_heads < 1 or n % heads:
        raise ValueError(f"weight has {n} rows: not (num_q_heads + 2 * num_kv_heads) = {heads} heads")
    head_dim = n // heads
    if head_dim % 2 or (head_dim // 2) % (config.block_n // 2):
        raise ValueError(f"config.block_n // 2 ({config.block_n // 2}) must divide head_dim // 2 ({head_dim // 2})")
    if cos_sin_cache.dim() != 3 or tuple(cos_sin_cache.shape[1:]) != (2, head_dim) or not cos_sin_cache.is_contiguous():
        raise ValueError(f"cos_sin_cache must be a contiguous [P, 2, {head_dim}]; got {tuple(cos_sin_cache.shape)}")
    if positions.shape != (num_rows,):
        raise ValueError(f"positions must be [{num_rows}]; got {tuple(positions.shape)}")
    if kv_cache is not None:
        validate_kv_cache(kv_cache, num_rows, num_kv_heads, head_dim, x.dtype)
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, out, config, False, rope=(positions, cos_sin_cache, kv_cache, num_q_heads, num_kv_heads))
    return out


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: SkinnyGemmConfig,
                  gated: bool) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [M, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    num_rows, width = x.shape
    n, k = weight.shape
    if width != (2 * k if gated else k):
        raise ValueError(f"x has {width} columns; weight [N, K={k}] needs {2 * k if gated else k}"
                         f"{' ([gate | up])' if gated else ''}")
    if x.dtype not in _SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one dtype among float16/bfloat16/float32; "
                         f"got {x.dtype} and {weight.dtype}")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and weight must have contiguous last dimensions")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{n}] {x.dtype}; got {tuple(bias.shape)} {bias.dtype}")
    if config.block_m == 1 and num_rows > 1:
        raise ValueError(f"config.block_m 1 takes one row of x; got {num_rows}")
    if config.split_k > 1 and num_rows > MAX_SKINNY_ROWS:
        raise ValueError(f"split_k > 1 takes at most {MAX_SKINNY_ROWS} rows of x; got {num_rows}")


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            config: SkinnyGemmConfig, gated: bool, rope: tuple | None = None) -> None:
    num_rows = x.shape[0]
    n, k = weight.shape
    if num_rows == 0:
        return
    partials, arrivals = _split_k_workspace(x.device, n) if config.split_k > 1 else (out, out)
    if rope is not None:
        positions, cos_sin_cache, kv_cache, num_q_heads, num_kv_heads = rope
        k_cache, v_cache, slots = kv_cache if kv_cache is not None else (out, out, positions)
        cache_strides = k_cache.stride()[:3] if kv_cache is not None else (0, 0, 0)
        rope_args = (positions, cos_sin_cache, k_cache, v_cache, slots, cos_sin_cache.stride(0), *cache_strides,
                     num_q_heads, num_kv_heads)
        rope_half = n // (num_q_heads + 2 * num_kv_heads) // 2
        page_size = k_cache.shape[1] if kv_cache is not None else 1
    else:
        rope_args = (out, out, out, out, out, 0, 0, 0, 0, 0, 0)
        rope_half, page_size, kv_cache = 0, 1, None
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(num_rows, config.block_m), config.split_k)
    _skinny_gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, out, partials, arrivals,
        num_rows, n, k, x.stride(0), weight.stride(0), out.stride(0),
        *rope_args,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=config.split_k, PARTIAL_ROWS=MAX_SKINNY_ROWS,
        EVEN_K=k % config.block_k == 0, GATED=gated, HAS_BIAS=bias is not None,
        GATED_ONE_ROW=gated and num_rows == 1 and config.block_m > 1,
        USE_DOT=config.block_m > 1,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_IN_FP32=x.device.type != "cuda" and x.dtype != torch.float32,
        ROPE_HALF=rope_half, WRITE_CACHE=kv_cache is not None, PAGE_SIZE=page_size,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(x.device, num_rows),
    )


def rope_config(num_rows: int, n: int, k: int, head_dim: int, device: torch.device) -> SkinnyGemmConfig | None:
    """select_config's choice for a qkv product when skinny_gemm_rope can take it (its strips pair
    up within a head), else None."""
    config = select_config(num_rows, n, k, device)
    if config is None or head_dim % 2 or (head_dim // 2) % (config.block_n // 2):
        return None
    return config


def select_config(num_rows: int, n: int, k: int, device: torch.device,
                  gated: bool = False) -> SkinnyGemmConfig | None:
    """The config for an [num_rows, k] x [n, k]^T product, or None where cuBLAS (F.linear) is the better call.

    The rules come from sweeps on an H200 (benchmarks/kernels/bench_gemm.py, bf16, weights read
    from HBM; Llama-3.1-8B and Qwen3-0.6B shapes at M = 1 and 16): the kernel wins on LM heads
    (8B: 238 vs 256 us), on projections up to ~32M weights (8B o_proj 11.6 vs 13.2 us) and most on
    narrow outputs, with split-K (Qwen3 o_proj 4.9 vs 12.6 us; its gated down_proj 6.0 us against
    9.0 us for cuBLAS plus the SiLU kernel); cuBLAS streams the large MLP weights as fast or
    faster (8B gate_up 56.9 vs 58.5 us). PAGELLM_SKINNY_GEMM=0 turns the kernel off (None always);
    PAGELLM_SKINNY_TILES sets the tiles of given shapes on CUDA (parse_tile_overrides).
    """
    if num_rows > MAX_SKINNY_ROWS or num_rows == 0 or not _ENABLED:
        return None
    override = _TILE_OVERRIDES.get((n, k)) if device.type == "cuda" else None
    if override is not None:
        # SiLU-gated products take it at one row (where the kernel activates that row only); at
        # more rows they run as SiluAndMul followed by the plain product, which takes it.
        return None if (gated or override.block_m == 1) and num_rows > 1 else override
    if device.type != "cuda":
        # The CPU interpreter (tests): small tiles, so small shapes still cross tile edges, and wide
        # strips for wide outputs (an LM head), since the interpreter pays per program.
        return SkinnyGemmConfig(block_m=1 if num_rows == 1 else 16, block_n=16 if n <= 256 else 512,
                                block_k=32, num_warps=4, num_stages=1)
    if gated:
        # Every program re-reads (and re-activates) all of x: worth it for one row only. Strips and
        # K slices make ~256 programs (8B down_proj: 32 rows x 2 slices, Qwen3: 16 rows x 4).
        if num_rows > 1 or n > 4096:
            return None
        block_n = 32 if n >= 4096 else 16
        split = max(1, min(8, 256 // triton.cdiv(n, block_n)))
        return SkinnyGemmConfig(1, block_n, 512, num_warps=4, num_stages=1, split_k=1 << (split.bit_length() - 1))
    if n >= 65536:  # an LM head
        return SkinnyGemmConfig(16, 64, 128, num_warps=4, num_stages=4)
    if n * k > 32 * 2**20:
        return None
    if n <= 2048:
        return SkinnyGemmConfig(16, 32, 128, num_warps=4, num_stages=4, split_k=4)
    if n <= 4096:
        return SkinnyGemmConfig(16, 32, 256 if k >= 4096 else 128, num_warps=4, num_stages=5)
    if k >= 4096:
        return SkinnyGemmConfig(16, 64, 256, num_warps=4, num_stages=4)
    return None

