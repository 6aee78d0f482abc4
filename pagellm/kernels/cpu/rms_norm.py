"""RMSNorm (with the residual add fused in) on the CPU through a small C kernel (rms_norm.c).

The PyTorch path is an add, then torch.rms_norm: on 2 threads a decode batch of 64 rows of 576
spent ~140 us per norm there, mostly in bf16 conversions and dispatch. The kernel does the add,
the sum of squares and the scaled write in one pass per row, rounding as that path rounds
(the sum of s = x + residual in the dtype, then s * rsqrt(mean(s^2) + eps) * weight in fp32,
rounded once). Built at first use (kernels/cpu/build.py); PAGELLM_CPU_NORM_KERNEL=0 turns it off.
"""

from __future__ import annotations

import ctypes

import torch

from pagellm.kernels.cpu.build import load_library

MAX_COLS = 16384  # the kernel's row buffer (rms_norm.c)
_DTYPES = (torch.bfloat16, torch.float32)


_SIGNATURES = (("rms_norm", ctypes.c_int,
                tuple([ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int])),)


def load() -> ctypes.CDLL | None:
    """The compiled kernel library (built and loaded once: load_library caches it), or None where
    it is switched off or cannot be built."""
    return load_library("rms_norm", "PAGELLM_CPU_NORM_KERNEL", _SIGNATURES)


def supports(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes these inputs: CPU, 2-D bf16/fp32 rows with contiguous columns."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.dtype in _DTYPES and x.stride(-1) == 1
            and 1 <= x.shape[1] <= MAX_COLS and weight.dtype == x.dtype and weight.shape == (x.shape[1],)
            and weight.is_contiguous()
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                      and residual.stride(-1) == 1))
            and load() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x) * weight over rows of x [T, N]; with `residual`, of s = x + residual, returning
    (norm(s), s). Call `supports()` first."""
    if not supports(x, weight, residual):
        raise ValueError("the CPU RMSNorm kernel does not take these inputs; check supports() first")
    return launch(x, weight, eps, residual)


def launch(x: torch.Tensor, weight: torch.Tensor, eps: float,
           residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm() without its check, for a caller that has just had supports() accept the inputs."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=x.dtype)
    residual_out = torch.empty(rows, cols, dtype=x.dtype) if residual is not None else None
    if rows:
        load().rms_norm(
            x.data_ptr(), residual.data_ptr() if residual is not None else None, weight.data_ptr(),
            out.data_ptr(), residual_out.data_ptr() if residual_out is not None else None,
            rows, cols, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            residual_out.stride(0) if residual_out is not None else 0, float(eps),
            1 if x.dtype == torch.bfloat16 else 0)
    return (out, residual_out) if residual is not None else out
