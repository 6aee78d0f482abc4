"""The CPU RMSNorm C kernel against the PyTorch path it replaces, and its use by RMSNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagellm.kernels.cpu import rms_norm as cpu_norm
from pagellm.layers.norm import RMSNorm

pytestmark = pytest.mark.skipif(cpu_norm.load() is None, reason="no C compiler to build the kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 576), (64, 576), (9, 37), (20, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cpu_rms_norm_matches_torch(dtype, rows, cols, with_residual):
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols + 3, generator=g).to(dtype)[:, :cols]    # strided rows
    residual = torch.randn(rows, cols, generator=g).to(dtype) if with_residual else None
    weight = (torch.randn(cols, generator=g) * 0.5 + 1).to(dtype)
    got = cpu_norm.rms_norm(x, weight, 1e-5, residual)
    s = x + residual if with_residual else x
    expected = F.rms_norm(s, (cols,), weight, 1e-5)
    if with_residual:
        got, got_s = got
        assert torch.equal(got_s, s)  # the sum rounds as torch's add
    # Only the order of the sum of squares differs: fp32 rounding, or one bf16 step on a few entries.
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    if dtype == torch.bfloat16:
        assert (got != expected).float().mean().item() < 0.01


def test_rms_norm_module_takes_the_kernel_on_the_cpu(monkeypatch):
    norm = RMSNorm(64, eps=1e-6)
    x, residual = torch.randn(5, 64), torch.randn(5, 64)
    calls = []
    original = cpu_norm.launch
    monkeypatch.setattr(cpu_norm, "launch", lambda *a, **k: calls.append(1) or original(*a, **k))
    out, s = norm(x, residual)
    assert calls and torch.allclose(out, F.rms_norm(x + residual, (64,), norm.weight, 1e-6), atol=1e-5)
    gemma = RMSNorm(64, offset=1.0)  # (1 + weight): the PyTorch path, which rounds the sum first
    gemma(x)
    assert len(calls) == 1


def test_cpu_rms_norm_rejects_what_it_does_not_take():
    x = torch.randn(2, 8)
    assert not cpu_norm.supports(x, torch.randn(8, dtype=torch.float64))
    assert not cpu_norm.supports(x.half(), torch.randn(8).half())
    assert not cpu_norm.supports(x.t(), torch.randn(2))
    with pytest.raises(ValueError, match="supports"):
        cpu_norm.rms_norm(x, torch.randn(7), 1e-6)
