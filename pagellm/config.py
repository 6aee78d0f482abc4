"""Engine configuration: one frozen dataclass per concern, each validated on creation."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
GIB = 1 << 30


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """Maps a user dtype ('auto', 'bfloat16', torch.float16, ...) to a torch dtype; None for 'auto'."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; got {dtype}")
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; got {dtype!r}")
    return _DTYPES[dtype]


def parse_memory_size(value: int | float | str | None, field: str) -> int | None:
    """Bytes from an int/float (values under 1024 are read as GiB, larger ones as bytes) or a
    string such as '4GiB', '512MiB', '2G'."""
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
        if not match:
            raise ValueError(f"{field} must be a size such as 4GiB or 512MiB or a number of bytes; got {value!r}")
        scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
        if scale == 1 and float(match.group(1)) < 1024:
            scale = GIB
        size = int(float(match.group(1)) * scale)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        size = int(value * GIB) if value < 1024 else int(value)
    else:
        raise ValueError(f"{field} must be a number of bytes, of GiB, or a size string; got {value!r}")
    if size <= 0:
        raise ValueError(f"{field} must be positive; got {value!r}")
    return size


@dataclass(frozen=True)
class ModelConfig:
    """What model runs and how its numbers are stored."""

    model: str
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    load_format: str = "auto"
    generation_config: str = "auto"
    seed: int = 0
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")
        if self.generation_config not in ("auto", "pagellm", "vllm"):
            raise ValueError(f"generation_config must be 'auto' or 'pagellm'; got {self.generation_config!r}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size and the memory it may take."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = decided from the device
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1; got {self.num_gpu_blocks_override}")


@dataclass(frozen=True)
class SchedulerConfig:
    """How much work one step may hold."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1; got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off; got "
                f"{self.max_num_batched_tokens} < {self.max_model_len}")
