"""What a launched step hands back: its sampled tokens (and logprobs), still on the device until
the host asks for them.

The engine launches step N + 1 before it reads step N, so the read-back must wait for step N's
copies only, not for everything queued since: each step's tensors are copied to pinned host
memory (on the model runner's copy stream where there is one) behind an event of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagellm.core.scheduler import ScheduledRequest
from pagellm.layers.sampler import SamplerOutput


@dataclass
class StepResult:
    """What one step produced, on the host."""

    # request_id -> sampled token, for requests that reached the end of their known tokens
    sampled: dict[str, int]
    # request_id -> (sampled token logprob, rank, [(token, logprob), ...] top-k) when logprobs were asked
    logprobs: dict[str, tuple[float, int, list[tuple[int, float]]]]
    # request_id -> [(position's token, its logprob, rank, top-k list)] for prompt positions computed now
    prompt_logprobs: dict[str, list[tuple[int, float, int, list[tuple[int, float]]]]]


class _ReadBack:
    """Device tensors copied to pinned host memory behind the work queued so far; `values()` waits
    for that copy alone, not for whatever the device was given after it."""

    def __init__(self, tensors: dict[str, torch.Tensor], copy_stream: torch.cuda.Stream | None = None) -> None:
        """`copy_stream`: where the copies run (it waits for the current stream first), so the
        compute stream goes on to the next step without a copy in between."""
        self._tensors = tensors
        self._host: dict[str, torch.Tensor] | None = None
        self._ready: torch.cuda.Event | None = None
        devices = [t.device for t in tensors.values() if t.is_cuda]
        if not devices:
            return
        current = torch.cuda.current_stream(devices[0])
        stream = copy_stream if copy_stream is not None else current
        self._host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for name, t in tensors.items()}
        self._ready = torch.cuda.Event()
        if copy_stream is not None:
            copy_stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for name, t in tensors.items():
                self._host[name].copy_(t, non_blocking=True)
            self._ready.record(stream)
        if copy_stream is not None:
            for t in tensors.values():
                t.record_stream(copy_stream)

    def values(self) -> dict[str, list]:
        if self._ready is None:
            return {name: t.tolist() for name, t in self._tensors.items()}
        self._ready.synchronize()
        return {name: h.tolist() for name, h in self._host.items()}


class PendingStep:
    """A launched step whose sampled tokens (and logprobs, if asked) are still on the device.

    `resolve()` waits for them (the step's one host-device sync) and returns the StepResult.
    """

    def __init__(self, request_ids: list[str], sampled: torch.Tensor | None, result: StepResult,
                 copy_stream: torch.cuda.Stream | None = None,
                 logprobs: tuple[list[int | None], SamplerOutput] | None = None) -> None:
        """`sampled`: [S] tokens, rows in request_ids order. `logprobs`: each row's number of top
        logprobs asked (None: none) and the sampler's output holding them. Both are read back on
        `copy_stream` (see _ReadBack)."""
        self.request_ids = request_ids
        self.scheduled: list[ScheduledRequest] = []  # set by the engine after launch
        self.sampled = sampled  # [S] int64 on the device until resolved; the next step may read it
        self.result = result
        self._logprob_ks: list[int | None] | None = None
        tensors = {"sampled": sampled} if sampled is not None else {}
        if logprobs is not None:
            self._logprob_ks, out = logprobs
            tensors.update(logprob=out.sampled_logprobs, rank=out.sampled_ranks)
            if out.topk_token_ids is not None:
                tensors.update(top_ids=out.topk_token_ids, top_logprobs=out.topk_logprobs)
        self._read = _ReadBack(tensors, copy_stream) if tensors else None

    @property
    def copied(self) -> torch.cuda.Event | None:
        """Fires once the read-back has copied the step's device tensors (None off CUDA or when
        nothing is read back)."""
        return self._read._ready if self._read is not None else None

    def resolve(self) -> StepResult:
        if self._read is not None:
            values = self._read.values()
            self._read = None
            self.result.sampled = dict(zip(self.request_ids, values["sampled"]))
            if self._logprob_ks is not None:
                top_ids, top_lps = values.get("top_ids"), values.get("top_logprobs")
                for i, (request_id, k) in enumerate(zip(self.request_ids, self._logprob_ks)):
                    if k is not None:
                        top = list(zip(top_ids[i][:k], top_lps[i][:k])) if k and top_ids is not None else []
                        self.result.logprobs[request_id] = (values["logprob"][i], values["rank"][i], top)
            self.sampled = None
        return self.result
