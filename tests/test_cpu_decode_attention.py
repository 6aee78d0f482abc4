"""The CPU decode-attention C kernel against the PyTorch reference, and its use by the torch backend."""

from __future__ import annotations

import pytest
import torch

from pagellm.kernels.cpu import decode_attention as cpu_decode
from pagellm.kernels.reference import paged_attention_ref

pytestmark = pytest.mark.skipif(cpu_decode.load() is None, reason="no C compiler to build the kernel")


def _step(num_seqs, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 1, 50, 7, 64, 33][:num_seqs] * 4,
                        dtype=torch.int32)[:num_seqs]
    width = -(-int(lens.max()) // block_size)
    num_blocks = num_seqs * width + 3
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[:num_seqs * width].view(num_seqs, width).to(torch.int32)
    q = torch.randn(num_seqs, heads, head_dim, generator=g).to(dtype)
    return q, k, v, tables, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 2, 32, 4), (4, 4, 48, 8),
                                                                (16, 2, 128, 16), (4, 2, 64, 32)])
@pytest.mark.parametrize("window,cap", [(None, None), (5, None), (None, 30.0)])
@pytest.mark.parametrize("per_item", [None, 1])
def test_cpu_decode_attention_matches_reference(dtype, heads, kv_heads, head_dim, block_size, window, cap, per_item):
    q, k, v, tables, lens = _step(12, heads, kv_heads, head_dim, block_size, dtype)
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    ref = paged_attention_ref(q, k, v, tables, lens, qsl, 0.125, window, cap)
    out = cpu_decode.paged_decode_attention(q, k, v, tables, lens, 0.125, window, cap, kv_heads_per_item=per_item)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: the output's rounding
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_cpu_decode_attention_strided_query_and_bad_input():
    q, k, v, tables, lens = _step(3, 4, 2, 32, 8, torch.float32)
    wide = torch.randn(3, 6, 32)
    wide[:, :4] = q  # query rows strided, as a view of a fused qkv tensor
    qsl = torch.arange(4, dtype=torch.int32)
    out = cpu_decode.paged_decode_attention(wide[:, :4], k, v, tables, lens, 0.2)
    torch.testing.assert_close(out, paged_attention_ref(q, k, v, tables, lens, qsl, 0.2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kv_heads_per_item"):
        cpu_decode.paged_decode_attention(q, k, v, tables, lens, 0.2, kv_heads_per_item=3)
    with pytest.raises(ValueError, match="supports"):
        cpu_decode.paged_decode_attention(q.half(), k.half(), v.half(), tables, lens, 0.2)
    assert not cpu_decode.supports(q.half(), k.half())
