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
        # Tokens sampled on the GPU whose values the host has not read yet (asynchronous steps).
        self.num_pending = 0
        self.block_ids: list[int] = []
        self.num_preemptions = 0
        # Prefix caching (core/kv_cache.py). Chained hashes of the full blocks of all_token_ids
        # seen so far (content-derived, so they survive preemption); how many leading blocks of
        # block_ids are registered in the cache; inputs other than token ids that change the KV
        # (a LoRA id, a cache salt), mixed into every block hash.
        self.block_hashes: list[int] = []
        self.num_cached_blocks = 0
        self.cache_extra_keys: tuple | None = None
        # Prompt tokens served from the prefix cache (or a sibling) at the first admission.
        self.num_cached_tokens = 0
        # For a sibling of an n > 1 request: the sibling that computes the shared prompt. The
        # scheduler admits this one once the source has computed the prompt's full blocks, and
        # it then shares them instead of computing them again.
        self.fork_source: Request | None = None
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
    def num_tokens_with_pending(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def may_need_more_tokens(self) -> bool:
        """False once the pending tokens reach max_tokens: the request will finish when they are read."""
        return len(self.output_token_ids) + self.num_pending < self.max_tokens

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
