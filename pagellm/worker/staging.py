"""Pinned host buffers for a step's inputs, reused every step.

Pinning memory per step costs more than the copy itself; with persistent pinned buffers each
input is one memcpy into the buffer and one asynchronous host-to-device copy. Before a buffer is
refilled, the event recorded after the previous step's copies is waited on, so an in-flight copy
never reads a half-written buffer. Two sets of buffers alternate, so filling step N's inputs waits
only for step N-2, which has finished by then even when steps run asynchronously.
"""

from __future__ import annotations

import numpy as np
import torch


class StagingBuffers:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._slot = 0

    def begin_step(self) -> None:
        """Switches to the other buffer set and waits until its last copies have completed."""
        self._slot ^= 1
        event = self._copied[self._slot]
        if event is not None:
            event.synchronize()
            self._copied[self._slot] = None

    def end_step(self) -> None:
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            self._copied[self._slot] = event

    @property
    def slot(self) -> int:
        """Which of the two buffer sets this step fills (0 or 1)."""
        return self._slot

    def host_buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """This step's (pinned on CUDA) host buffer `name` of at least `numel` elements."""
        key = (self._slot, name)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1024), dtype=dtype, pin_memory=self.pinned)
            self._buffers[key] = buf
        return buf

    def put(self, name: str, values, dtype: torch.dtype) -> torch.Tensor:
        """A device tensor holding `values` (a list or 1-D/2-D numpy array)."""
        array = np.asarray(values)
        if not self.pinned:
            return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        buf = self.host_buffer(name, array.size, dtype)
        host = buf[:array.size].view(array.shape)
        host.numpy()[...] = array
        return host.to(self.device, non_blocking=True)
