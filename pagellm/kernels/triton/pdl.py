"""Programmatic dependent launch (PDL) for the decode step's chain of small Triton kernels.

On Hopper a kernel launched with PDL may be scheduled while the kernel before it in the stream is
still finishing: its programs become resident and wait at `griddepcontrol.wait` until the previous
kernel has completed and its writes are visible. That hides the launch and ramp-up gap between
back-to-back kernels (a few microseconds each, hundreds of kernels per decode step).

Every kernel that takes a USE_PDL flag calls `enter_pdl` first, before any load or early return, so
a chain stays ordered: each kernel completes only after its predecessor did. Kernels without PDL
(cuBLAS, PyTorch ops) order the stream as usual. PAGELLM_PDL=0 turns it off.
"""

from __future__ import annotations

import functools
import os

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
    has_option = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return has_option and hasattr(cuda_extra, "gdc_wait") and hasattr(cuda_extra, "gdc_launch_dependents")


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (CUDA, compute capability >= 9, Triton support)."""
    if device.type != "cuda":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def pdl_options(device: torch.device) -> dict:
    """Launch keywords and the USE_PDL flag for a kernel that calls `enter_pdl`."""
    on = use_pdl(device)
    return {"USE_PDL": on, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def enter_pdl(USE_PDL: tl.constexpr):
    # Wait for the previous kernel's writes, then let the next kernel's programs be scheduled.
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
