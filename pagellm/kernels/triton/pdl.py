"""Programmatic dependent launch (PDL): a decode step's Triton kernels start while the kernel
before them finishes.

Inside a CUDA graph each kernel node otherwise waits for the previous one to complete and only
then gets its programs scheduled: ~0.4 us of idle GPU per boundary, about 250 boundaries in a
decode step of an 8B model. On Hopper a kernel launched with PDL has its programs scheduled once
every program of the kernel before it has called `release_dependents` (or exited); they then wait
in `wait_for_inputs` until that kernel has completed and its writes are visible.

Every kernel here calls `wait_for_inputs` before it reads what the kernel before it may have
written, and before it writes anything; it calls `release_dependents` once its main loop is done,
so only its epilogue overlaps the next kernel's start. Reads of what no kernel of the step writes
(RMSNorm's weight) or what was written before the kernel before it started (attention's block
tables and sequence bounds) may come first: a kernel's programs are only scheduled once every
program of the kernel before it has passed its own wait, so everything earlier has completed.
Kernels that do not take part (cuBLAS, PyTorch ops) order the stream as usual; the wait is a no-op
in a kernel launched without PDL. Launches over more than PDL_MAX_ROWS rows, whose neighbours are
cuBLAS GEMMs, go without it (PAGELLM_PDL=all: with it). PAGELLM_PDL=0 turns it off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from types import MappingProxyType

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    if os.environ.get("PAGELLM_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as cuda_extra
    except ImportError:
        return False
    return ("launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
            and hasattr(cuda_extra, "gdc_wait") and hasattr(cuda_extra, "gdc_launch_dependents"))


_ON = MappingProxyType({"USE_PDL": True, "launch_pdl": True})
_OFF = MappingProxyType({"USE_PDL": False})


# Above this many rows (tokens) a step's GEMMs are cuBLAS kernels, which take no part in PDL, and
# the Triton kernels between them gain nothing from it: gpu-thr, whose steps are mostly larger, ran
# 0.4% faster with PDL off (H200, two alternating pairs).
PDL_MAX_ROWS = 16
_ALL_ROWS = os.environ.get("PAGELLM_PDL") == "all"


def pdl_options(device: torch.device, num_rows: int) -> Mapping:
    """Keyword arguments for a launch of a kernel with a USE_PDL parameter over `num_rows` rows:
    PDL on for decode-sized launches (every launch with PAGELLM_PDL=all) where the device (CUDA,
    compute capability >= 9) and Triton support it."""
    return _device_options(device) if num_rows <= PDL_MAX_ROWS or _ALL_ROWS else _OFF


@functools.lru_cache(maxsize=None)
def _device_options(device: torch.device) -> Mapping:
    # Decided once per device: every launch of the step's kernels asks.
    on = device.type == "cuda" and _supported(device.index if device.index is not None
                                              else torch.cuda.current_device())
    return _ON if on else _OFF


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    # Returns once the kernel before this one has completed and its writes are visible.
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_dependents(USE_PDL: tl.constexpr):
    # Lets the next kernel's programs be scheduled (they still wait for this kernel to complete).
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
