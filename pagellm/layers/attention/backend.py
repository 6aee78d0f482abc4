"""The attention-backend interface and the per-step metadata every backend reads."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where one step's tokens sit in the batch and in the KV cache.

    Tokens are flattened and grouped per sequence; the first `num_decodes` sequences have exactly
    one query token each (the model runner orders them so).
    """

    slot_mapping: torch.Tensor     # [T] int64: cache slot (block * block_size + offset) of each new token; -1 = padding
    query_start_loc: torch.Tensor  # [S + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor         # [S] int32: context length per sequence, this step's tokens included
    block_tables: torch.Tensor     # [S, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    num_decodes: int               # leading sequences with one query token
    num_decode_tokens: int
    query_lens_cpu: list[int]      # host copies for backends that loop on the host
    seq_lens_cpu: list[int]
    # [S] int32, decode-only steps: a permutation of the sequences, longest first, that attention
    # may take its programs in (a schedule only; results do not depend on it).
    seq_order: torch.Tensor | None = None


class AttentionBackend(ABC):
    """Writes a step's new K/V into the cache and attends over it."""

    name: str

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None, logits_soft_cap: float | None = None,
                kv_written: bool = False) -> torch.Tensor:
        """query [T, H, D], key/value [T, Hkv, D], caches [num_blocks, block_size, Hkv, D] -> [T, H, D].

        Mutates the caches: the new keys and values land at `meta.slot_mapping` (unless `kv_written`
        says a fused kernel has already put them there).
        """


def get_attention_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """Picks a backend: `name`, else $PAGELLM_ATTENTION_BACKEND, else the best for the device."""
    name = name or os.environ.get("PAGELLM_ATTENTION_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    name = name.lower()
    if name == "torch":
        from pagellm.layers.attention.torch_backend import TorchAttentionBackend
        return TorchAttentionBackend()
    if name == "triton":
        from pagellm.layers.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be 'torch' or 'triton'; got {name!r}")
