"""Programmatic dependent launch (kernels/triton/pdl.py): off without CUDA; on the GPU a chain of
PDL kernels inside a CUDA graph reads each predecessor's finished output."""

import pytest
import torch

from pagellm.kernels.triton.pdl import PDL_MAX_ROWS, pdl_options


def test_pdl_is_off_without_cuda():
    assert pdl_options(torch.device("cpu"), 1) == {"USE_PDL": False}


def test_pdl_is_off_above_decode_sized_launches():
    # Decided from the row count alone: no CUDA needed.
    assert pdl_options(torch.device("cuda"), PDL_MAX_ROWS + 1) == {"USE_PDL": False}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_chain_of_pdl_kernels_in_a_graph_matches_eager_torch():
    from pagellm.kernels.triton.rms_norm import rms_norm
    from pagellm.kernels.triton.skinny_gemm import select_config, skinny_gemm
    torch.manual_seed(0)
    device = torch.device("cuda")
    hidden, layers = 1024, 8
    weights = [torch.randn(hidden, hidden, device=device, dtype=torch.bfloat16) / hidden ** 0.5
               for _ in range(layers)]
    norm = torch.rand(hidden, device=device, dtype=torch.bfloat16) + 0.5
    x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
    config = select_config(1, hidden, hidden, device)
    assert config is not None

    def chain(h):
        residual = h
        for w in weights:  # each kernel reads the one before it: a race shows as a wrong sum
            h, residual = rms_norm(skinny_gemm(h, w, config=config), norm, 1e-6, residual=residual)
        return h

    def reference(h):
        residual = h.float()
        for w in weights:
            s = (h.float() @ w.float().T).to(torch.bfloat16).float() + residual
            residual = s.to(torch.bfloat16).float()
            h = (residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.float()).to(torch.bfloat16)
        return h

    static_in = x.clone()
    chain(static_in)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_in)
    for _ in range(5):
        static_in.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(static_out.float(), reference(static_in).float(), atol=0.05, rtol=0.05)
