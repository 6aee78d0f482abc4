"""The engine: owns the loop schedule -> execute -> update -> outputs."""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass

import torch

from pagellm.core.kv_cache import KVCacheManager
from pagellm.core.scheduler import Scheduler
from pagellm.engine.args import EngineArgs
from pagellm.engine.input_processor import InputProcessor, PromptType
from pagellm.engine.output_processor import OutputProcessor
from pagellm.engine.request import Request, RequestStatus
from pagellm.models.builder import build_model
from pagellm.models.loader import open_model_source
from pagellm.models.registry import resolve_model_class
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams
from pagellm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_used_blocks: int
    num_blocks: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    # Prefix cache, in tokens (vLLM's counters): prompt tokens looked up at admission, and
    # those found already computed.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class LLMEngine:
    """The engine loop. `add_request` queues work; each `step` runs one batch and reports the
    requests it advanced (on CUDA a step's tokens are reported by the next call, see step()).
    Not thread-safe: one caller drives it (the server's AsyncLLMEngine uses one engine thread)."""

    def __init__(self, args: EngineArgs) -> None:
        start = time.perf_counter()
        self.args = args
        device = args.resolve_device()
        self.device = device
        source = open_model_source(args.model, args.tokenizer, args.load_format, args.trust_remote_code,
                                   skip_tokenizer_init=args.skip_tokenizer_init)
        architecture, cls = resolve_model_class(source.hf_config)
        spec = cls.spec_from_config(source.hf_config)
        self.model_config = mc = args.create_model_config(source, architecture, spec, device)
        self.scheduler_config = args.create_scheduler_config(mc.max_model_len, device)
        self.cache_config = args.create_cache_config()
        torch.manual_seed(args.seed)
        model = build_model(source, mc.dtype, device, args.seed)
        self.runner = ModelRunner(model, mc, self.cache_config, device, args.attention_backend,
                                  max_num_seqs=self.scheduler_config.max_num_seqs,
                                  max_num_batched_tokens=self.scheduler_config.max_num_batched_tokens)
        self.kv_cache = KVCacheManager(self.runner.num_blocks, self.cache_config.block_size,
                                       enable_prefix_caching=args.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_cache)
        self.tokenizer = source.tokenizer
        self.generation_config = source.generation_config or {}
        self.eos_token_ids = self._eos_ids(source.hf_config)
        self.inputs = InputProcessor(self.tokenizer, mc.max_model_len, spec.vocab_size)
        self.outputs = OutputProcessor(self.tokenizer, mc.max_model_len)
        self.groups: dict[str, list[Request]] = {}
        self.final_only: set[str] = set()
        # Steps overlap host and device work on CUDA (see step()).
        # PAGELLM_ASYNC_STEPS: "0" turns it off, "force" turns it on everywhere (tests on the CPU).
        mode = os.environ.get("PAGELLM_ASYNC_STEPS", "1")
        self.async_steps = mode == "force" or (device.type == "cuda" and mode != "0")
        self._in_flight = None
        # Set when a request reuses the id of one in the step in flight (aborted or finished
        # since): the runner finds a request's unread token in that step by id, so the new request
        # would take the old one's token as its own. The next step reads that step first.
        self._id_reused_in_flight = False
        self._ids = itertools.count()
        self.num_preemptions = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info("engine ready in %.2f s: %s (%s) on %s, %s, KV cache %d tokens, max_model_len %d",
                    time.perf_counter() - start, mc.model, architecture, device, mc.dtype,
                    self.kv_capacity_tokens, mc.max_model_len)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_cache.num_blocks * self.cache_config.block_size

    def _eos_ids(self, hf_config) -> set[int]:
        """End-of-sequence ids: generation_config.json's, else config.json's, plus the tokenizer's."""
        ids: set[int] = set()
        eos = self.generation_config.get("eos_token_id", getattr(hf_config, "eos_token_id", None))
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.add(int(tok_eos))
        return ids

    def default_sampling_params(self) -> SamplingParams:
        """The model's generation_config.json defaults (or vLLM's own with generation_config='pagellm')."""
        if self.model_config.generation_config == "auto":
            return SamplingParams.from_defaults(self.generation_config)
        return SamplingParams()

    def new_request_id(self) -> str:
        return str(next(self._ids))

    # ---- requests ---------------------------------------------------------------------------
    def validate(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenizes and checks a request without queueing it. Raises ValueError on bad input."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams; got {type(params).__name__}")
        text, ids = self.inputs.process(prompt)
        params.verify_token_ids(self.model_config.vocab_size)
        if params.detokenize is False and params.stop:
            raise ValueError("stop strings need detokenize=True")
        # max_tokens=None generates up to max_model_len, so the request may grow that far; a
        # request that cannot fit alone would be preempted and recomputed forever.
        max_len = self.model_config.max_model_len
        total = max_len if params.max_tokens is None else min(len(ids) + params.max_tokens, max_len)
        total = max(total, len(ids) + 1)
        if self.kv_cache.blocks_for(total) > self.kv_cache.num_blocks:
            raise ValueError(f"request needs {total} tokens of KV cache but the pool holds only "
                             f"{self.kv_capacity_tokens}; raise kv_cache_memory or lower max_tokens")
        return text, ids

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None, validated: tuple[str | None, list[int]] | None = None,
                    stream: bool = True) -> None:
        """Queues a request (n sequences for n > 1). Raises ValueError on bad input, queueing nothing.

        With `stream=False` (vLLM's FINAL_ONLY outputs) step() reports the request only when it
        finishes, which spares building an output per token.
        """
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = validated or self.validate(prompt, params)
        arrival = arrival_time or time.time()
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                child_params.n = 1
                if params.seed is not None:
                    child_params.seed = params.seed + i
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            child = Request(child_id, text, ids, child_params, self.eos_token_ids, self.model_config.max_model_len,
                            arrival, parent_id=request_id, index=i)
            self.outputs.init_request(child)
            children.append(child)
        # Siblings share the prompt's blocks once the first one has computed them.
        for child in children[1:]:
            child.fork_source = children[0]
        if self._in_flight is not None and not self._id_reused_in_flight:
            child_ids = {child.request_id for child in children}
            self._id_reused_in_flight = any(item.request.request_id in child_ids for item in self._in_flight.scheduled)
        self.groups[request_id] = children
        if not stream:
            self.final_only.add(request_id)
        for child in children:
            self.scheduler.add_request(child)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stops requests now and frees their KV blocks. Unknown ids are ignored."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.final_only.discard(rid)
            for child in self.groups.pop(rid, []):
                if not child.is_finished:
                    self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
                self.runner.release(child.request_id)
        if not self.groups:
            self._in_flight = None  # nothing left that its tokens could update

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups) or self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns a RequestOutput for each request it advanced (cumulative).

        On CUDA the step is asynchronous: it launches step N, then reads and applies step N-1's
        tokens (and logprobs) while the device works, so host work overlaps device work. Step N
        takes N-1's tokens from the device where it needs them (inputs, penalties). Steps that
        score prompt tokens (prompt_logprobs) run synchronously.
        """
        sched = self.scheduler.schedule()
        self.num_preemptions += len(sched.preempted)
        outputs: list[RequestOutput] = []
        sync = (not self.async_steps or self._id_reused_in_flight
                or any(self._needs_sync(item.request) for item in sched.scheduled))
        self._id_reused_in_flight = False
        if self._in_flight is not None and sync:
            outputs += self._apply(self._in_flight)
            self._in_flight = None
            # Requests that finished just now were scheduled in vain; their blocks are already free.
            sched.scheduled = [item for item in sched.scheduled if not item.request.is_finished]
        if sched.is_empty:
            if self._in_flight is not None:
                outputs += self._apply(self._in_flight)
                self._in_flight = None
            return outputs
        scheduled_time = time.time()  # before the forward pass, so queueing and prefill time separate
        self.runner.zero_blocks(self.kv_cache.take_new_blocks())
        launched = self.runner.launch(sched, self._in_flight)
        for item in sched.scheduled:
            r = item.request
            if r.metrics.first_scheduled_time is None:
                r.metrics.first_scheduled_time = scheduled_time
            if r.num_computed_tokens < r.num_prompt_tokens:
                self.prompt_tokens_total += min(item.num_new_tokens, r.num_prompt_tokens - r.num_computed_tokens)
            if item.samples:
                r.num_pending += 1
            r.num_computed_tokens += item.num_new_tokens
        launched.scheduled = sched.scheduled
        if self._in_flight is not None:
            outputs += self._apply(self._in_flight)
        if sync:
            outputs += self._apply(launched)
            self._in_flight = None
        else:
            self._in_flight = launched
        return outputs

    @staticmethod
    def _needs_sync(request: Request) -> bool:
        return request.sampling_params.prompt_logprobs is not None

    def _apply(self, step) -> list[RequestOutput]:
        """Reads a launched step's tokens and applies them: detokenize, stop checks, outputs."""
        result = step.resolve()
        touched: dict[str, None] = {}
        for item in step.scheduled:
            r = item.request
            if r.request_id in result.prompt_logprobs and not r.is_finished:
                self.outputs.append_prompt_logprobs(r, result.prompt_logprobs[r.request_id])
            token = result.sampled.get(r.request_id)
            if token is None:
                continue
            r.num_pending -= 1
            if r.is_finished:
                continue  # finished (or aborted) while this step was in flight
            self.generation_tokens_total += 1
            status = self.outputs.append_token(r, token, result.logprobs.get(r.request_id))
            if status is not None:
                # Stamped now, after the output processor stamped the last token.
                r.metrics.finished_time = time.time()
                self.scheduler.finish(r, status)
                self.runner.release(r.request_id)
            if status is not None or r.parent_id not in self.final_only:
                touched[r.parent_id] = None
        outputs = []
        for parent_id in touched:
            children = self.groups.get(parent_id)
            if children is None:
                continue
            if parent_id in self.final_only and not all(c.is_finished for c in children):
                continue
            out = self.outputs.request_output(children)
            if out.finished:
                del self.groups[parent_id]
                self.final_only.discard(parent_id)
            outputs.append(out)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           kv_cache_usage=self.kv_cache.usage, num_used_blocks=self.kv_cache.num_used_blocks,
                           num_blocks=self.kv_cache.num_blocks, num_preemptions=self.num_preemptions,
                           prompt_tokens=self.prompt_tokens_total, generation_tokens=self.generation_tokens_total,
                           prefix_cache_queries=self.kv_cache.stats.queries,
                           prefix_cache_hits=self.kv_cache.stats.hits)

    def reset_prefix_cache(self) -> bool:
        """Forgets the cached KV blocks no request holds (the hit counters keep counting).

        Returns True if the cache is now empty, False if blocks held by running requests stay
        cached.
        """
        return self.kv_cache.reset_prefix_cache()
