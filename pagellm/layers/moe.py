"""Mixture-of-experts feed-forward: a router picks top-k experts per token, each a gated MLP.

Expert weights are stacked, `gate_up_proj` [E, 2 I, H] (gate rows first) and `down_proj` [E, H, I],
the layout of transformers' fused checkpoints; per-expert checkpoint tensors load into their slice.
The computation groups the (token, choice) pairs by expert so each expert runs one matmul over all of
its tokens: on CUDA through the Triton grouped matmul (no host sync, CUDA-graph safe), elsewhere
and for large eager GPU steps through a loop over the experts that received tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.layers.activation import gated_activation
from pagellm.layers.linear import Linear

_SHARDS = {"gate_proj": 0, "up_proj": 1, "down_proj": None}
# From this many (token, choice) pairs on, an eager (not graph-captured) step runs the per-expert
# cuBLAS loop: on an H200 at Mixtral shape it beat the Triton kernel from 2048 tokens x top-2 on
# (3.0 vs 4.3 ms), while the kernel won below that and needs no host sync.
_TORCH_LOOP_MIN_PAIRS = 4096


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int64).

    Softmax over all experts in fp32, then the top k; `renormalize` rescales them to sum to one.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_moe_torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """x [T, H], gate_up [E, 2 I, H], down [E, H, I], weights/ids [T, k] -> [T, H].

    Sorts the T * k (token, choice) pairs by expert and runs each expert once on its group. The
    group sizes are read on the host, which syncs on a GPU: this is the portable path.
    """
    t, k = ids.shape
    flat_ids = ids.reshape(-1)  # [T k]
    order = torch.argsort(flat_ids, stable=True)  # [T k], pair indices grouped by expert
    token_of = order // k  # [T k] token of each sorted pair
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()
    xs = x[token_of]  # [T k, H]
    out = torch.empty_like(xs)
    start = 0
    for expert, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            out[rows] = F.linear(act(F.linear(xs[rows], gate_up[expert])), down[expert])  # [n, H]
            start += n
    out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)  # [T k, H]
    return torch.zeros_like(x).index_add_(0, token_of, out)


class FusedMoE(nn.Module):
    """`num_experts` gated MLPs of width `intermediate_size`; each token uses its router's top k."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, hidden_act: str = "silu") -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={num_experts}]; got {top_k}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act = gated_activation(hidden_act)
        self.hidden_act = hidden_act

    def load_expert(self, expert: int, name: str, tensor: torch.Tensor) -> str:
        """Copies one expert's checkpoint tensor (`name` gate_proj, up_proj or down_proj) into place;
        returns the parameter it filled."""
        if name not in _SHARDS or not 0 <= expert < self.num_experts:
            raise ValueError(f"no expert tensor {name!r} for expert {expert} (num_experts={self.num_experts})")
        shard = _SHARDS[name]
        if shard is None:
            target, param = self.down_proj.data[expert], "down_proj"
        else:
            size = self.intermediate_size
            target, param = self.gate_up_proj.data[expert, shard * size:(shard + 1) * size], "gate_up_proj"
        if target.shape != tensor.shape:
            raise ValueError(f"expert {expert} {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        return param

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H], router_logits [T, E] -> [T, H]."""
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        if x.is_cuda and self.hidden_act in ("silu", "swish") and (
                torch.cuda.is_current_stream_capturing() or ids.numel() < _TORCH_LOOP_MIN_PAIRS):
            from pagellm.kernels.triton.moe import grouped_moe_triton
            return grouped_moe_triton(x, self.gate_up_proj, self.down_proj, weights, ids)
        return grouped_moe_torch(x, self.gate_up_proj, self.down_proj, weights, ids, self.act)


class SparseMoeBlock(nn.Module):
    """Router + experts, and optionally a shared expert that every token uses, scaled by its own
    sigmoid gate (Qwen2-MoE)."""

    def __init__(self, hidden_size: int, experts: FusedMoE, shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, experts.num_experts)
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))  # [T, H]
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [T, H]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
