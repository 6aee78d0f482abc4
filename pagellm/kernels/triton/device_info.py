"""Facts about the CUDA device that kernels' launch heuristics read."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H200)."""
    return _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())
