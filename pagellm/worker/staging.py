"""Pinned host buffers for a step's inputs, reused every step.

Pinning memory per step costs more than the copy itself; with persistent pinned buffers each
input is one memcpy into the buffer and one asynchronous host-to-device copy. Before a buffer is
refilled, the event recorded after the previous step's copies is waited on, so an in-flight copy
never reads a half-written buffer.
"""

from __future__ import annotations

import numpy as np
import torch


class StagingBuffers:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None

    def begin_step(self) -> None:
        """Waits until the previous step's copies have left the host buffers."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def end_step(self) -> None:
        if self.pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1024), dtype=dtype, pin_memory=self.pinned)
            self._buffers[name] = buf
        return buf

    def put(self, name: str, values, dtype: torch.dtype) -> torch.Tensor:
        """A device tensor holding `values` (a list or 1-D/2-D numpy array)."""
        array = np.asarray(values)
        if not self.pinned:
            return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        buf = self._buffer(name, array.size, dtype)
        host = buf[:array.size].view(array.shape)
        host.numpy()[...] = array
        return host.to(self.device, non_blocking=True)
