"""The Triton skinny GEMM (decode-batch products, optional SiLU-gated input) against PyTorch.

On the CPU it runs in Triton's interpreter at small shapes; with CUDA the `gpu` test adds the
model shapes of Llama-3.1-8B and Qwen3-0.6B at decode batch sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagellm.kernels.reference import silu_and_mul_ref
from pagellm.kernels.triton.skinny_gemm import MAX_SKINNY_ROWS, SkinnyGemmConfig, select_config, skinny_gemm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu


def _reference(x, w, b, gated):
    x = silu_and_mul_ref(x) if gated else x
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def _check(y, ref, dtype, k):
    # fp32: summation order only. Half precision: the output's own rounding plus the input's.
    scale = ref.abs().max().item() + 1.0
    tol = {torch.float32: 1e-5 * k ** 0.5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    assert (y.float() - ref).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,config", [
    (1, SkinnyGemmConfig(1, 16, 32, num_stages=1)),     # FMA path
    (1, SkinnyGemmConfig(16, 16, 32, num_stages=2)),    # tensor-core path, one row padded to 16
    (7, SkinnyGemmConfig(16, 32, 16, num_stages=2)),
    (19, SkinnyGemmConfig(16, 16, 64, num_stages=1)),   # two row tiles, K not a multiple of BLOCK_K
    (1, SkinnyGemmConfig(1, 16, 16, num_stages=1, split_k=4)),   # split-K: 5 steps of K over 4 slices
    (9, SkinnyGemmConfig(16, 32, 16, num_stages=1, split_k=2)),
    (16, SkinnyGemmConfig(16, 16, 32, num_stages=1, split_k=8)),  # more slices than K steps: some empty
])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_gemm_matches_reference(dtype, rows, config, gated, bias):
    g = torch.Generator().manual_seed(rows)
    n, k = 40, 72  # N not a multiple of BLOCK_N: the last strip's rows are masked
    x = torch.randn(rows, 2 * k if gated else k, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    _check(skinny_gemm(x, w, b, config=config, gated=gated), _reference(x, w, b, gated), dtype, k)


def test_skinny_gemm_strided_rows_and_bad_input():
    x = torch.randn(3, 80).to(DEVICE)[:, :64]  # rows strided, last dim contiguous
    w = torch.randn(24, 64).to(DEVICE)
    config = SkinnyGemmConfig(16, 16, 32, num_stages=1)
    _check(skinny_gemm(x, w, config=config), _reference(x, w, None, False), torch.float32, 64)
    buffer = torch.full((5, 24), float("nan"), device=DEVICE)  # rows [0, 3) of a larger output
    assert skinny_gemm(x, w, config=config, out=buffer[:3]).data_ptr() == buffer.data_ptr()
    _check(buffer[:3], _reference(x, w, None, False), torch.float32, 64)
    assert buffer[3:].isnan().all()
    with pytest.raises(ValueError, match="out must be"):
        skinny_gemm(x, w, config=config, out=buffer[:2])
    with pytest.raises(ValueError, match="columns"):
        skinny_gemm(x, torch.randn(24, 48).to(DEVICE), config=config)
    with pytest.raises(ValueError, match=r"\[gate \| up\]"):
        skinny_gemm(x, w, config=config, gated=True)
    with pytest.raises(ValueError, match="dtype"):
        skinny_gemm(x, w.half(), config=config)
    with pytest.raises(ValueError, match="bias"):
        skinny_gemm(x, w, torch.zeros(23).to(DEVICE), config=config)
    with pytest.raises(ValueError, match="block_m 1"):
        skinny_gemm(x, w, config=SkinnyGemmConfig(1, 16, 32))
    with pytest.raises(ValueError, match="block_n"):
        SkinnyGemmConfig(16, 24, 32)
    with pytest.raises(ValueError, match="split_k"):
        SkinnyGemmConfig(16, 16, 32, split_k=3)
    with pytest.raises(ValueError, match="split_k"):
        SkinnyGemmConfig(32, 16, 32, split_k=2)


def test_split_k_leaves_its_counters_at_zero_and_repeats_exactly():
    from pagellm.kernels.triton import skinny_gemm as module
    x = torch.randn(2, 72).to(DEVICE)
    w = torch.randn(40, 72).to(DEVICE)
    config = SkinnyGemmConfig(16, 16, 16, num_stages=1, split_k=4)
    first = skinny_gemm(x, w, config=config)
    assert torch.equal(skinny_gemm(x, w, config=config), first)  # slices added in a fixed order
    _, arrivals = module._split_k_workspace(x.device, 40)
    assert int(arrivals.abs().sum()) == 0


def test_select_config_rules():
    # The H200-measured rules read host ints only: no CUDA needed to check them.
    cuda = torch.device("cuda")
    assert select_config(MAX_SKINNY_ROWS + 1, 4096, 4096, cuda) is None    # large batches: cuBLAS
    assert select_config(0, 4096, 4096, cuda) is None
    assert select_config(1, 28672, 4096, cuda) is None                     # big MLP weights: cuBLAS
    assert select_config(1, 128256, 4096, cuda).block_m == 16              # LM heads
    assert select_config(1, 1024, 2048, cuda).split_k == 4                 # narrow output: split K
    assert select_config(1, 6144, 1024, cuda) is None                      # Qwen3 gate_up: a tie, cuBLAS
    assert select_config(1, 1024, 3072, cuda, gated=True).split_k == 4     # ~256 programs
    assert select_config(1, 4096, 14336, cuda, gated=True).split_k == 2
    assert select_config(1, 14336, 4096, cuda, gated=True) is None
    assert select_config(16, 1024, 3072, cuda, gated=True) is None
    assert select_config(4, 64, 64, torch.device("cpu")).block_m == 16     # the interpreter: always


def test_config_parse_round_trips_and_tile_overrides_apply(monkeypatch):
    from pagellm.kernels.triton import skinny_gemm as module
    for config in (SkinnyGemmConfig(16, 64, 256, num_stages=6), SkinnyGemmConfig(1, 32, 512, 8, 1, split_k=2)):
        assert SkinnyGemmConfig.parse(str(config)) == config
    for bad in ("16x64x256", "16x64x256w4s4k", "16x24x256w4s4"):
        with pytest.raises(ValueError):
            SkinnyGemmConfig.parse(bad)
    overrides = module.parse_tile_overrides(" 6144x4096=16x64x256w4s6, 4096x14336=1x32x512w4s1k2,")
    assert overrides == {(6144, 4096): SkinnyGemmConfig(16, 64, 256, num_stages=6),
                         (4096, 14336): SkinnyGemmConfig(1, 32, 512, num_stages=1, split_k=2)}
    with pytest.raises(ValueError, match="NxK=config"):
        module.parse_tile_overrides("6144=16x64x256w4s6")
    monkeypatch.setattr(module, "_TILE_OVERRIDES", overrides)
    cuda = torch.device("cuda")
    assert select_config(16, 6144, 4096, cuda) == SkinnyGemmConfig(16, 64, 256, num_stages=6)
    assert select_config(1, 4096, 14336, cuda).split_k == 2
    assert select_config(2, 4096, 14336, cuda) is None                 # a one-row config, two rows: cuBLAS
    assert select_config(1, 4096, 14336, cuda, gated=True).split_k == 2
    assert select_config(16, 6144, 4096, cuda, gated=True) is None     # gated rows: SiluAndMul, then the override
    assert select_config(4, 64, 64, torch.device("cpu")).block_k == 32  # the interpreter keeps its tiles


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,gated", [(6144, 4096, False), (4096, 4096, False), (1024, 3072, True),
                                       (1024, 2048, False), (151936, 1024, False), (1000, 3000, True)])
def test_skinny_gemm_at_model_shapes(dtype, n, k, gated):
    g = torch.Generator(device="cuda").manual_seed(n)
    configs = [SkinnyGemmConfig(1, 16, 512, num_warps=8, num_stages=1), SkinnyGemmConfig(16, 32, 256, num_stages=5),
               SkinnyGemmConfig(16, 64, 128, num_stages=3)]
    for rows in (1, 3, 16):
        x = torch.randn(rows, 2 * k if gated else k, device="cuda", dtype=dtype, generator=g)
        w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k ** 0.5
        ref = _reference(x, w, None, gated)
        for config in configs + [select_config(rows, n, k, x.device, gated=gated)]:
            if config is None or (config.block_m == 1 and rows > 1):
                continue
            _check(skinny_gemm(x, w, config=config, gated=gated), ref, dtype, k)


def _rope_reference(qkv, positions, cos_sin_cache, num_rotated, dtype):
    """qkv [M, heads, D] in the model dtype -> the q and k heads rotated as the unfused kernels do."""
    half = qkv.shape[-1] // 2
    cs = cos_sin_cache[positions].to(dtype).float()                     # [M, 2, D]
    cos, sin = cs[:, 0, None, :], cs[:, 1, None, :]                      # [M, 1, D]
    x = qkv[:, :num_rotated].float()
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]], -1)
    out = qkv.clone()
    out[:, :num_rotated] = rotated.to(dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,config,head_dim", [
    (1, SkinnyGemmConfig(1, 16, 32, num_stages=1), 32),                # FMA path, half-strips of 8
    (3, SkinnyGemmConfig(16, 16, 32, num_stages=2), 16),               # half-strips are whole halves
    (5, SkinnyGemmConfig(16, 32, 16, num_stages=1, split_k=2), 64),    # split-K: the last slice rotates
])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_gemm_rope_matches_linear_then_rope(dtype, rows, config, head_dim, bias):
    from pagellm.kernels.triton.skinny_gemm import skinny_gemm_rope
    g = torch.Generator().manual_seed(rows + head_dim)
    hq, hkv, k, block_size = 4, 2, 48, 4
    n = (hq + 2 * hkv) * head_dim
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    positions = torch.randint(0, 50, (rows,), generator=g).to(DEVICE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(64).float()[:, None] * torch.cat([inv_freq, inv_freq])[None, :]
    cos_sin_cache = torch.stack([angles.cos(), angles.sin()], dim=1).to(DEVICE)   # [64, 2, D]
    k_cache = torch.full((8, block_size, hkv, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    slots = torch.randperm(8 * block_size, generator=g)[:rows].to(DEVICE)
    slots[rows // 2] = -1  # a padding row: computed, never cached

    out = skinny_gemm_rope(x, w, b, config=config, num_q_heads=hq, num_kv_heads=hkv, positions=positions,
                           cos_sin_cache=cos_sin_cache, kv_cache=(k_cache, v_cache, slots))
    qkv = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype).view(rows, -1, head_dim)
    expected = _rope_reference(qkv, positions, cos_sin_cache, hq + hkv, dtype)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.view(rows, -1, head_dim).float(), expected.float(), atol=tol, rtol=tol)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            block, offset = divmod(slot, block_size)
            torch.testing.assert_close(k_cache[block, offset], out.view(rows, -1, head_dim)[row, hq:hq + hkv])
            torch.testing.assert_close(v_cache[block, offset], out.view(rows, -1, head_dim)[row, hq + hkv:])
    written = (~k_cache.isnan().all(dim=-1).all(dim=-1)).sum().item()
    assert written == sum(1 for s in slots.tolist() if s >= 0)  # nothing else was touched


def test_skinny_gemm_rope_rejects_bad_input():
    from pagellm.kernels.triton.skinny_gemm import skinny_gemm_rope
    x, w = torch.randn(2, 16).to(DEVICE), torch.randn(4 * 32, 16).to(DEVICE)   # 4 heads of 32
    table = torch.zeros(8, 2, 32).to(DEVICE)
    positions = torch.zeros(2, dtype=torch.long).to(DEVICE)
    config = SkinnyGemmConfig(16, 16, 16, num_stages=1)
    with pytest.raises(ValueError, match="heads"):
        skinny_gemm_rope(x, w, None, config=config, num_q_heads=3, num_kv_heads=1, positions=positions,
                         cos_sin_cache=table)
    with pytest.raises(ValueError, match="block_n"):
        skinny_gemm_rope(x, w, None, config=SkinnyGemmConfig(16, 64, 16), num_q_heads=2, num_kv_heads=1,
                         positions=positions, cos_sin_cache=table)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        skinny_gemm_rope(x, w, None, config=config, num_q_heads=2, num_kv_heads=1, positions=positions,
                         cos_sin_cache=table[:, :, :16])
    with pytest.raises(ValueError, match="positions"):
        skinny_gemm_rope(x, w, None, config=config, num_q_heads=2, num_kv_heads=1, positions=positions[:1],
                         cos_sin_cache=table)
