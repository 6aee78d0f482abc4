"""Attention over the paged KV cache, behind a small backend interface."""

from pagellm.layers.attention.backend import AttentionBackend, AttentionMetadata, get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
