"""Continuous batching: which requests compute how many tokens in the next step.

There are no prefill and decode phases. Each request has `num_computed_tokens` and a target
(its prompt plus outputs so far); a step gives each scheduled request some tokens toward that
target under one token budget. Running requests go first (their decode tokens, or the next
chunk of a long prompt), then waiting ones, in arrival order. When the KV pool runs dry the
most recently admitted running request is preempted: its blocks are freed and it is recomputed
later from its prompt and outputs, so it is never lost or duplicated.

Prefix caching lives in the KV cache manager; the scheduler's part is to ask it, when it admits
a request, which leading blocks are already computed (so only the rest is scheduled), and to
let it register the blocks that earlier steps filled. Siblings of an n > 1 request wait until
the first sibling has computed the prompt, then share its blocks; likewise a new request whose
next block another request is computing right now waits for it (a burst of requests with one
system prompt computes the prompt once).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagellm.config import SchedulerConfig
from pagellm.core.kv_cache import KVCacheManager
from pagellm.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed for it this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's known tokens, so a token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens_with_pending


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add_request(self, request: Request) -> None:
        """Queues a request. The caller has checked that it can fit in the KV pool alone."""
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        """Picks the next step's work and allocates its KV blocks. Mutates block_ids and status."""
        out = SchedulerOutput()
        # Blocks that earlier steps filled become findable before anyone is admitted.
        for request in self.running:
            self.kv_cache.cache_full_blocks(request)
        budget = self.config.max_num_batched_tokens
        kept: list[Request] = []
        running = list(self.running)
        while running:
            request = running.pop(0)
            if budget == 0:
                kept.append(request)
                continue
            if request.num_pending and not request.may_need_more_tokens:
                kept.append(request)  # finishes once its pending tokens are read
                continue
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            while not self.kv_cache.allocate_slots(request, num_new):
                # Preempt the newest running request (possibly this one) to free blocks.
                victim = running.pop() if running else request
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new))
                kept.append(request)
                budget -= num_new
        self.running = kept

        if not out.preempted:
            deferred: list[Request] = []
            # Blocks that running requests are still computing: a new request whose next block
            # is one of them waits and then finds it cached, instead of computing it again.
            in_flight = ({h for r in self.running for h in self.kv_cache.uncomputed_block_hashes(r)}
                         if self.waiting else set())
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                request = self.waiting[0]
                if request.num_pending:
                    break  # its last token is still on the GPU; admitted once it has been read
                if self._waits_for_fork_source(request):
                    deferred.append(self.waiting.popleft())
                    continue
                computed = self.kv_cache.find_computed_blocks(request)
                if in_flight and self.kv_cache.next_block_hash(request, len(computed or ())) in in_flight:
                    deferred.append(self.waiting.popleft())
                    continue
                remaining = request.num_tokens - request.num_computed_tokens
                remaining -= len(computed or ()) * self.kv_cache.block_size
                num_new = min(remaining, budget)
                if not self.config.enable_chunked_prefill and num_new < remaining:
                    break
                if not self.kv_cache.allocate_slots(request, num_new, computed):
                    break
                self.waiting.popleft()
                request.fork_source = None
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                in_flight.update(self.kv_cache.uncomputed_block_hashes(request))
                out.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
            # Deferred siblings keep their place at the head of the queue.
            self.waiting.extendleft(reversed(deferred))
        return out

    def _waits_for_fork_source(self, request: Request) -> bool:
        """Whether a forked sibling should wait for its source to compute the shared prompt blocks.

        Admitting it earlier would compute the same prompt twice. It stops waiting once the
        source has computed them or has finished (its blocks are then in the prefix cache, if
        that is on), or when there is nothing to share.
        """
        source = request.fork_source
        if source is None:
            return False
        shareable = self.kv_cache.num_shareable_blocks(request)
        if source.is_finished or shareable == 0 or request.num_computed_tokens > 0:
            request.fork_source = None
            return False
        computed_blocks = min(source.num_computed_tokens // self.kv_cache.block_size, len(source.block_ids))
        return computed_blocks < shareable

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Marks a request finished (or aborted), removes it from the queues and frees its blocks."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv_cache.free(request)
