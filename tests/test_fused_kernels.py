"""Triton fused kernels (RMSNorm + residual, q/k norm + RoPE, SiLU-and-mul, Gumbel sampling) against
their PyTorch references. On the CPU they run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); with CUDA the same tests run compiled, and `gpu` tests add model shapes."""

from __future__ import annotations

import pytest
import torch

from pagellm.kernels.reference import qk_norm_rope_ref, rms_norm_ref, silu_and_mul_ref, write_kv_cache_ref
from pagellm.kernels.triton.activation import silu_and_mul
from pagellm.kernels.triton.rms_norm import rms_norm
from pagellm.kernels.triton.rotary import qk_norm_rope_
from pagellm.kernels.triton.gumbel_sampling import gumbel_sample
from pagellm.layers.rotary import RotaryEmbedding

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    # Two roundings of the dtype apart at most (the CPU interpreter truncates where a GPU rounds).
    tol = {torch.float32: 1e-5, torch.bfloat16: 3.2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_cols", [64, 96])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_reference(dtype, n_cols, offset):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, n_cols, generator=g).to(DEVICE, dtype) * 3
    r = torch.randn(5, n_cols, generator=g).to(DEVICE, dtype)
    w = torch.randn(n_cols, generator=g).to(DEVICE, dtype)
    _close(rms_norm(x, w, 1e-6, offset), rms_norm_ref(x, w, 1e-6, offset), dtype)
    out, s = rms_norm(x, w, 1e-6, offset, residual=r)
    ref_out, ref_s = rms_norm_ref(x, w, 1e-6, offset, residual=r)
    _close(out, ref_out, dtype)
    # The residual sum is one rounding: identical on the GPU (the CPU interpreter truncates to bf16).
    if DEVICE.type == "cuda" or dtype == torch.float32:
        assert torch.equal(s, ref_s)
    _close(s, ref_s, dtype)


def test_rms_norm_strided_rows_and_bad_input():
    x = torch.randn(4, 80).to(DEVICE)[:, :64]  # rows strided, last dim contiguous
    w = torch.ones(64, device=DEVICE)
    _close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(63, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, 1e-5, residual=torch.ones(4, 63, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (8, 1, 32), (3, 3, 48)])
@pytest.mark.parametrize("norm", [False, True])
def test_qk_norm_rope_matches_reference(dtype, heads, kv_heads, head_dim, norm):
    g = torch.Generator().manual_seed(1)
    tokens = 7
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    rope = RotaryEmbedding(head_dim, 512, 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))
    cache = rope.cos_sin_cache.to(DEVICE)
    positions = torch.tensor([0, 1, 5, 17, 100, 311, 511], device=DEVICE)
    qw = kw = None
    if norm:
        qw = torch.randn(head_dim, generator=g).to(DEVICE, dtype)
        kw = torch.randn(head_dim, generator=g).to(DEVICE, dtype)
    expected = qk_norm_rope_ref(qkv, heads, kv_heads, positions, cache, qw, kw, 1e-6, 0.0)
    actual = qkv.clone()
    qk_norm_rope_(actual, heads, kv_heads, positions, cache, qw, kw, 1e-6, 0.0)
    _close(actual, expected, dtype)
    assert torch.equal(actual[:, heads + kv_heads:], qkv[:, heads + kv_heads:])  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,norm", [(4, 2, 64, True), (8, 1, 32, False), (3, 3, 48, True)])
def test_qk_norm_rope_also_writes_the_kv_cache(dtype, heads, kv_heads, head_dim, norm):
    # The fused write equals rotating, then write_kv_cache_ref; padding slots (-1) write nothing.
    g = torch.Generator().manual_seed(2)
    tokens, num_blocks, block_size = 7, 6, 4
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    rope = RotaryEmbedding(head_dim, 512, 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))
    table = rope.cos_sin_cache.to(DEVICE)
    positions = torch.tensor([3, 4, 5, 17, 100, 311, 0], device=DEVICE)
    slots = torch.tensor([9, 10, 11, 0, -1, 23, 4], device=DEVICE)
    qw = kw = None
    if norm:
        qw = torch.randn(head_dim, generator=g).to(DEVICE, dtype)
        kw = torch.randn(head_dim, generator=g).to(DEVICE, dtype)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    expected = qk_norm_rope_ref(qkv, heads, kv_heads, positions, table, qw, kw, 1e-6, 0.0)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(expected[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:], k_expected, v_expected, slots)
    actual = qkv.clone()
    qk_norm_rope_(actual, heads, kv_heads, positions, table, qw, kw, 1e-6, 0.0, kv_cache=(k_cache, v_cache, slots))
    _close(actual, expected, dtype)
    _close(k_cache, k_expected, dtype)
    assert torch.equal(v_cache, v_expected)  # values are copied, not rounded
    assert torch.equal(actual[:, heads + kv_heads:], qkv[:, heads + kv_heads:])
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope_(actual, heads, kv_heads, positions, table, qw, kw, kv_cache=(k_cache, v_cache, slots[:3]))
    with pytest.raises(ValueError, match="k_cache"):
        qk_norm_rope_(actual, heads, kv_heads, positions, table, qw, kw, kv_cache=(k_cache[..., :2], v_cache, slots))


def test_qk_norm_rope_equals_the_unfused_rotation():
    # The layer's own (unfused) rotation is the model-level reference.
    head_dim, heads, kv_heads = 64, 4, 2
    qkv = torch.randn(6, heads + 2 * kv_heads, head_dim).to(DEVICE)
    rope = RotaryEmbedding(head_dim, 64, 1.0 / (500000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(DEVICE)
    positions = torch.arange(6, device=DEVICE) * 7
    expected = rope.rotate(qkv[:, :heads + kv_heads], rope.cos_sin(positions, qkv.dtype))
    qk_norm_rope_(qkv, heads, kv_heads, positions, rope.cos_sin_cache)
    _close(qkv[:, :heads + kv_heads], expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(dtype):
    x = (torch.randn(5, 2 * 72) * 4).to(DEVICE, dtype)
    _close(silu_and_mul(x), silu_and_mul_ref(x), dtype)
    with pytest.raises(ValueError, match="2 \\* d"):
        silu_and_mul(torch.randn(3, 5, device=DEVICE))


def test_gumbel_sample_greedy_rows_take_the_first_argmax():
    logits = torch.randn(4, 3000).to(DEVICE)  # several column chunks per row
    logits[2, 17] = logits[2, 2500] = 50.0  # a tie across chunks: the lower index wins, as torch.argmax
    out = gumbel_sample(logits, torch.zeros(4, device=DEVICE), seed=3)
    assert out.tolist() == logits.argmax(-1).tolist()
    assert out[2].item() == 17


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernels_at_model_shapes():
    g = torch.Generator(device="cuda").manual_seed(0)
    for hidden, heads, kv_heads, head_dim, inter in ((1024, 16, 8, 128, 3072), (4096, 32, 8, 128, 14336),
                                                     (640, 4, 1, 256, 2048)):
        x = torch.randn(257, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        r = torch.randn(257, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        out, s = rms_norm(x, w, 1e-6, residual=r)
        ref_out, ref_s = rms_norm_ref(x, w, 1e-6, residual=r)
        _close(out, ref_out, torch.bfloat16)
        assert torch.equal(s, ref_s)
        qkv = torch.randn(257, heads + 2 * kv_heads, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
        rope = RotaryEmbedding(head_dim, 4096, 1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim)))
        cache = rope.cos_sin_cache.cuda()
        pos = torch.randint(0, 4096, (257,), device="cuda", generator=g)
        qw = torch.randn(head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
        expected = qk_norm_rope_ref(qkv, heads, kv_heads, pos, cache, qw, qw)
        qk_norm_rope_(qkv, heads, kv_heads, pos, cache, qw, qw)
        _close(qkv, expected, torch.bfloat16)
        y = torch.randn(257, 2 * inter, device="cuda", generator=g, dtype=torch.bfloat16)
        _close(silu_and_mul(y), silu_and_mul_ref(y), torch.bfloat16)
    logits = torch.randn(256, 151936, device="cuda", generator=g, dtype=torch.bfloat16)
    assert torch.equal(gumbel_sample(logits, torch.zeros(256, device="cuda"), 1), logits.float().argmax(-1))
