"""Paged decode attention on the CPU through a small C kernel (paged_decode.c), built at first use.

The portable path gathers each sequence's K/V blocks into one tensor and runs SDPA: on the CPU the
gather alone was ~40% of a long-context decode step. The C kernel reads the blocks in place, one
(sequence, KV head) per OpenMP work item. It is compiled once per machine with the system's C
compiler (gcc, -march=native) into the user cache; where that fails, `load()` returns None and
the caller keeps the portable path. PAGELLM_CPU_ATTENTION_KERNEL=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode.c")
# The kernel's compiled limits (MAX_HEAD_DIM, MAX_GROUP, MAX_BLOCK in paged_decode.c).
MAX_HEAD_DIM, MAX_GROUP, MAX_BLOCK = 256, 16, 64
_DTYPES = (torch.bfloat16, torch.float32)


def _cache_dir() -> Path:
    root = os.environ.get("PAGELLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagellm")
    return Path(root) / "cpu_kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU must not load on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return platform.machine() + flags


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", str(_SOURCE), "-o", str(built), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()[:500]}")
        os.replace(built, target)  # atomic: a concurrent process sees the old file or the whole new one


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it is switched off or cannot be built."""
    if os.environ.get("PAGELLM_CPU_ATTENTION_KERNEL", "1") == "0" or platform.system() != "Linux":
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"paged_decode-{key}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        logger.warning("CPU decode-attention kernel unavailable, using gather + SDPA: %s", e)
        return None
    fn = lib.paged_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int] * 5 + [ctypes.c_int64] * 8
                   + [ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int])
    return lib


def supports(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these shapes and dtypes (CPU, bf16/fp32, within its limits)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    return (query.device.type == "cpu" and query.dtype in _DTYPES and k_cache.dtype == query.dtype
            and head_dim <= MAX_HEAD_DIM and block_size <= MAX_BLOCK and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= MAX_GROUP and query.stride(-1) == 1 and k_cache.stride(-1) == 1
            and load() is not None)


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, logits_soft_cap: float | None = None,
                           kv_heads_per_item: int | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    query [S, H, D] (last dim contiguous); caches [num_blocks, block_size, Hkv, D], query's dtype,
    same strides; block_tables [>= S, width] int32; seq_lens [S] int32 (including the query's own
    position, whose K/V are cached). Returns [S, H, D]. Call `supports()` first.
    `kv_heads_per_item` (a divisor of Hkv) fixes how the work is cut; None picks whole sequences
    when there are enough for every thread, else one KV head per work item.
    """
    lib = load()
    if lib is None or not supports(query, k_cache):
        raise ValueError("the CPU decode-attention kernel does not take these inputs; check supports() first")
    if k_cache.stride() != v_cache.stride() or v_cache.dtype != k_cache.dtype:
        raise ValueError("k_cache and v_cache must share dtype and strides")
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    tables = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    if tables.stride(-1) != 1:
        tables = tables.contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=query.dtype)
    if num_seqs == 0:
        return out
    kv_per_item = kv_heads_per_item or (num_kv_heads if num_seqs >= 4 * torch.get_num_threads() else 1)
    if num_kv_heads % kv_per_item:
        raise ValueError(f"kv_heads_per_item must divide num_kv_heads ({num_kv_heads}); got {kv_per_item}")
    status = lib.paged_decode_attention(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        tables.data_ptr(), lens.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, block_size,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        float(scale), int(sliding_window or 0), float(logits_soft_cap or 0.0),
        1 if query.dtype == torch.bfloat16 else 0, kv_per_item)
    if status != 0:
        raise ValueError("the CPU decode-attention kernel rejected the sizes")
    return out
