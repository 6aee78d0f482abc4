"""The fused MoE layer: routing, the grouped torch path and the Triton grouped matmul, each against a
per-token loop reference.

Without CUDA the Triton kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set before the
kernel module is imported) at small shapes; with CUDA the `gpu` test checks bf16 at a Mixtral-like shape.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated, so before the import below
triton = pytest.importorskip("triton")

from pagellm.kernels.triton import moe as moe_kernels  # noqa: E402
from pagellm.layers.activation import SiluAndMul  # noqa: E402
from pagellm.layers.moe import FusedMoE, grouped_moe_torch, route  # noqa: E402

if not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(moe_kernels._grouped_matmul_kernel, InterpretedFunction):
        moe_kernels = importlib.reload(moe_kernels)  # imported before TRITON_INTERPRET was set

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def loop_reference(x, gate_up, down, weights, ids):
    """One token and one chosen expert at a time, in fp32."""
    x, gate_up, down = x.float(), gate_up.float(), down.float()
    out = torch.zeros_like(x)
    inter = gate_up.shape[1] // 2
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = gate_up[e, :inter] @ x[t], gate_up[e, inter:] @ x[t]
            out[t] += float(weights[t, j]) * (down[e] @ (F.silu(gate) * up))
    return out


def make_inputs(t, e, k, h, i, dtype=torch.float32, seed=0, device=DEVICE, skew=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    gate_up = torch.randn(e, 2 * i, h, generator=gen) / h ** 0.5
    down = torch.randn(e, h, i, generator=gen) / i ** 0.5
    logits = torch.randn(t, e, generator=gen)
    if skew:
        logits[:, : e // 2] += 6.0  # most experts get no token at all
    return [v.to(device) for v in (x.to(dtype), gate_up.to(dtype), down.to(dtype), logits)]


def test_route_softmax_topk_and_renormalize() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, probs[:, [1, 2]])
    weights, _ = route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))
    assert weights.dtype == torch.float32


@pytest.mark.parametrize("t,e,k,skew", [(1, 4, 1, False), (7, 4, 2, False), (13, 8, 2, True), (6, 3, 3, False)])
def test_grouped_torch_matches_loop_reference(t, e, k, skew) -> None:
    x, gate_up, down, logits = make_inputs(t, e, k, 16, 24, device=torch.device("cpu"), skew=skew)
    weights, ids = route(logits, k, renormalize=True)
    ours = grouped_moe_torch(x, gate_up, down, weights, ids, SiluAndMul())
    torch.testing.assert_close(ours, loop_reference(x, gate_up, down, weights, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,e,k,block_m", [(1, 4, 2, 16), (9, 5, 2, 16), (40, 8, 3, 16)])
def test_align_by_expert_groups_and_pads(t, e, k, block_m) -> None:
    gen = torch.Generator().manual_seed(t)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])  # [T, k] distinct per token
    rows, tile_expert = moe_kernels.align_by_expert(ids, e, block_m)
    flat = ids.reshape(-1)
    real = rows[rows < t * k].long()
    assert sorted(real.tolist()) == list(range(t * k))  # every pair exactly once
    for tile, expert in enumerate(tile_expert.tolist()):
        chunk = rows[tile * block_m:(tile + 1) * block_m].long()
        chunk = chunk[chunk < t * k]
        if expert < 0:
            assert chunk.numel() == 0
        else:
            assert (flat[chunk] == expert).all()  # a tile holds one expert's pairs only


@pytest.mark.parametrize("t,e,k,skew", [(1, 4, 2, False), (11, 4, 2, False), (21, 6, 2, True)])
def test_triton_grouped_moe_matches_loop_reference(t, e, k, skew) -> None:
    # Small shapes that still leave partial N / K tiles: H 40, I 24, blocks of 16.
    x, gate_up, down, logits = make_inputs(t, e, k, 40, 24, skew=skew)
    weights, ids = route(logits, k, renormalize=True)
    ours = moe_kernels.grouped_moe_triton(x, gate_up, down, weights, ids, block_m=16, block_n=16, block_k=16)
    ref = loop_reference(x.cpu(), gate_up.cpu(), down.cpu(), weights.cpu(), ids.cpu())
    # On a GPU fp32 tl.dot runs in TF32.
    tol = 1e-5 if DEVICE.type == "cpu" else 2e-2
    torch.testing.assert_close(ours.cpu(), ref, atol=tol, rtol=tol)


def test_fused_moe_layer_loads_experts_and_runs() -> None:
    layer = FusedMoE(num_experts=3, top_k=2, hidden_size=8, intermediate_size=4, renormalize=False)
    gen = torch.Generator().manual_seed(0)
    per_expert = {(ex, n): torch.randn(*(4, 8) if n != "down_proj" else (8, 4), generator=gen)
                  for ex in range(3) for n in ("gate_proj", "up_proj", "down_proj")}
    for (ex, n), tensor in per_expert.items():
        layer.load_expert(ex, n, tensor)
    torch.testing.assert_close(layer.gate_up_proj[1, :4], per_expert[1, "gate_proj"])
    torch.testing.assert_close(layer.gate_up_proj[1, 4:], per_expert[1, "up_proj"])
    x, logits = torch.randn(5, 8, generator=gen), torch.randn(5, 3, generator=gen)
    weights, ids = route(logits, 2, renormalize=False)
    ref = loop_reference(x, layer.gate_up_proj.data, layer.down_proj.data, weights, ids)
    torch.testing.assert_close(layer(x, logits), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expert 3"):
        layer.load_expert(3, "up_proj", per_expert[0, "up_proj"])
    with pytest.raises(ValueError, match="shape"):
        layer.load_expert(0, "down_proj", per_expert[0, "up_proj"])
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        FusedMoE(num_experts=2, top_k=3, hidden_size=8, intermediate_size=4, renormalize=False)


@pytest.mark.gpu
def test_triton_grouped_moe_bf16_mixtral_shape() -> None:
    """bf16 at Mixtral-like width (8 experts, top 2; H 4096 and I 14336 scaled to a quarter)."""
    x, gate_up, down, logits = make_inputs(300, 8, 2, 1024, 3584, dtype=torch.bfloat16)
    weights, ids = route(logits, 2, renormalize=True)
    ours = moe_kernels.grouped_moe_triton(x, gate_up, down, weights, ids)
    ref = grouped_moe_torch(x.float(), gate_up.float(), down.float(), weights, ids, SiluAndMul())
    torch.testing.assert_close(ours.float(), ref, atol=3e-2, rtol=3e-2)
