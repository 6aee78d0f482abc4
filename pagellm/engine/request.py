"""A request's state as the engine tracks it between steps."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

from pagellm.outputs import Logprob, RequestMetrics

if TYPE_CHECKING:
    from pagellm.engine.detokenizer import IncrementalDetokenizer
    from pagellm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


class Request:
    """One sequence to generate. A user request with n > 1 becomes n of these (see ParentRequest).

    The scheduler reads and moves `num_computed_tokens`, `block_ids` and `status`; the output
    processor appends to `output_token_ids` and the text fields.
    """

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_ids: set[int], max_model_len: int,
                 arrival_time: float | None = None, parent_id: str | None = None, index: int = 0) -> None:
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.num_preemptions = 0
        # Cap so that the sequence never outgrows the model's context.
        budget = max_model_len - len(prompt_token_ids)
        self.max_tokens = budget if sampling_params.max_tokens is None else min(sampling_params.max_tokens, budget)
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(sampling_params.seed)
        # Outputs.
        self.detokenizer: IncrementalDetokenizer | None = None
        self.output_text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if sampling_params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.stop_reason: int | str | None = None
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None
