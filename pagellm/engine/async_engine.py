"""AsyncLLMEngine: the synchronous engine driven from asyncio, for the server.

One background task keeps the engine stepping while any request is in flight and sleeps on
an event when there is none. The engine is not thread-safe and a step is blocking CPU/GPU
work, so every engine call (validate, add, abort, step, stats, tokenizer use) runs on one
dedicated worker thread: the event loop keeps accepting and streaming requests while a step
runs, and the engine never sees two threads. The worker runs calls in submission order, so
an add or abort queued during a step takes effect before the next step.

Beam search (`beam_search`) runs as ordinary one-token requests per beam and step, batched
with everyone else's.

Each request gets an asyncio.Queue that the loop fills with cumulative RequestOutputs;
`generate` drains it. Leaving `generate` early (client disconnect, cancellation, `aclose`)
aborts the request at once, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Protocol, TypeVar

from pagellm.engine.args import EngineArgs
from pagellm.engine.async_beam_search import beam_search_async
from pagellm.engine.beam_search import beam_request_output
from pagellm.engine.engine import EngineStats, LLMEngine
from pagellm.engine.input_processor import PromptType
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

# When a step returns nothing although requests are in flight (their add is still queued
# behind the step, or the scheduler is waiting for blocks), wait this long before stepping
# again rather than spinning.
_IDLE_STEP_SLEEP_S = 0.001


class EngineStepError(RuntimeError):
    """The engine raised inside a step; the requests in that step were aborted."""


class EngineObserver(Protocol):
    """Receives what the loop sees, on the event loop thread (the server's metrics)."""

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None: ...

    def on_aborted(self, request_id: str) -> None: ...


class AsyncLLMEngine:
    """Serves many concurrent async callers from one LLMEngine (continuous batching).

    Create it outside the event loop (loading the model blocks), then `await start()` inside
    it. `generate` is an async generator of cumulative RequestOutputs.
    """

    def __init__(self, engine: LLMEngine, observer: EngineObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagellm-engine")
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._work: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    @classmethod
    def from_engine_args(cls, args: EngineArgs, observer: EngineObserver | None = None) -> AsyncLLMEngine:
        return cls(LLMEngine(args), observer)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Starts the background loop on the running event loop. Idempotent."""
        if self._loop_task is not None and not self._loop_task.done():
            return
        self._stopping = False
        self._work = asyncio.Event()
        self._loop_task = asyncio.create_task(self._run_loop(), name="pagellm-engine-loop")

    async def shutdown(self) -> None:
        """Stops the loop, fails requests still waiting, and releases the worker thread."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        for queue in self._streams.values():
            queue.put_nowait(EngineStepError("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- calls on the engine thread ----------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs `fn(*args, **kwargs)` on the engine thread (use it for anything that touches
        the engine or its tokenizer) and returns its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def validate(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """LLMEngine.validate on the engine thread. Raises ValueError for bad input."""
        return await self.run(self.engine.validate, prompt, params)

    async def get_stats(self) -> EngineStats:
        return await self.run(self.engine.stats)

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams,
                       arrival_time: float | None = None,
                       validated: tuple[str | None, list[int]] | None = None) -> AsyncIterator[RequestOutput]:
        """Queues a request and yields its cumulative outputs until the one with finished=True.

        Consecutive outputs that pile up while the caller is busy are merged into the newest
        (they are cumulative, so nothing is lost). Raises ValueError for bad input (nothing is
        queued) and EngineStepError if the engine failed in a step holding this request.
        Closing the generator early aborts the request and frees its KV blocks.
        """
        if self._work is None or not self.is_running:
            raise RuntimeError("AsyncLLMEngine.start() has not been awaited (or the loop has stopped)")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        finished = added = False
        try:
            await self.run(self.engine.add_request, request_id, prompt, params, arrival_time, validated)
            added = True
            self._work.set()
            while True:
                item = await queue.get()
                while not queue.empty() and not isinstance(item, BaseException):
                    item = queue.get_nowait()
                if isinstance(item, BaseException):
                    finished = True  # the loop already aborted it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                # Not awaited: this may run while the task is being cancelled. The worker runs
                # it after anything queued before it, so it cannot overtake the add.
                self._submit_abort(request_id)
                if added and self.observer is not None:
                    self.observer.on_aborted(request_id)

    async def beam_search(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                          params: BeamSearchParams, num_logprobs: int | None = None,
                          skip_special_tokens: bool = True) -> AsyncIterator[RequestOutput]:
        """Beam search for one validated, tokenized prompt, sharing the engine with every other
        request (engine/async_beam_search.py).

        Yields one finished RequestOutput (vLLM's shape): a CompletionOutput per beam, best
        first, with the generated tokens only. `num_logprobs` makes each beam's logprob
        entries hold at least the top that many, with their token texts. Closing or
        cancelling it aborts the step requests in flight.
        """
        output = await beam_search_async(self, request_id, prompt_token_ids, params, num_logprobs)
        yield await self.run(beam_request_output, request_id, prompt, prompt_token_ids, output,
                             self.engine.tokenizer, skip_special_tokens, num_logprobs is not None)

    def _submit_abort(self, request_id: str) -> None:
        try:
            self._executor.submit(self._abort_quietly, request_id)
        except RuntimeError:  # executor shut down: the server is stopping anyway
            pass

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - an abort must never take the worker down
            logger.exception("aborting request %s failed", request_id)

    # ---- the loop ----------------------------------------------------------------------------
    def _step(self) -> tuple[list[RequestOutput], EngineStats]:
        outputs = self.engine.step()
        return outputs, self.engine.stats()

    def _abort_step_requests(self) -> list[str]:
        """After a failed step: aborts the requests it was running (all of them if that is
        unknown) so they cannot fail again, and returns their ids."""
        engine = self.engine
        running = getattr(getattr(engine, "scheduler", None), "running", None)
        ids = {r.parent_id for r in running} if running else set()
        if not ids:
            ids = set(getattr(engine, "groups", ()))
        for rid in ids:
            self._abort_quietly(rid)
        return sorted(ids)

    async def _run_loop(self) -> None:
        assert self._work is not None
        while not self._stopping:
            if not self._streams:
                self._work.clear()
                await self._work.wait()
                continue
            try:
                outputs, stats = await self.run(self._step)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad step must not stop the server
                logger.exception("engine step failed; failing the requests in that step")
                await self._fail_step(exc)
                continue
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        # The request is done in the engine; its generator must not abort it.
                        self._streams.pop(out.request_id, None)
            if self.observer is not None:
                try:
                    self.observer.on_step(outputs, stats)
                except Exception:  # noqa: BLE001 - metrics must not break serving
                    logger.exception("engine observer failed")
            if not outputs:
                await asyncio.sleep(_IDLE_STEP_SLEEP_S)

    async def _fail_step(self, exc: Exception) -> None:
        try:
            failed = await self.run(self._abort_step_requests)
        except Exception:  # noqa: BLE001
            logger.exception("could not abort the failed step's requests; failing all")
            failed = list(self._streams)
        error = EngineStepError(f"the engine failed while running this request: {type(exc).__name__}: {exc}")
        for rid in failed:
            queue = self._streams.pop(rid, None)
            if queue is not None:
                queue.put_nowait(error)
