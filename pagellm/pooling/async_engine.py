"""AsyncEmbeddingEngine: many concurrent async callers, batched onto one EmbeddingEngine.

Callers put their (already tokenized) prompts on an asyncio queue and await a future. One
background task takes everything queued, runs it as one `embed_token_ids` call on the engine
thread, and resolves each caller's future with its vectors; requests arriving meanwhile queue
up and form the next batch, so under load every forward pass is full. All engine calls,
tokenizing included, run on one dedicated worker thread: the tokenizer is not thread-safe, and
the event loop stays free to accept requests while a batch runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from pagellm.engine.args import EngineArgs
from pagellm.pooling.engine import EmbeddingEngine

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Pending:
    token_ids: list[list[int]]
    future: asyncio.Future[list[torch.Tensor]]


class AsyncEmbeddingEngine:
    """Create it outside the event loop (loading blocks), then `await start()` inside it."""

    def __init__(self, engine: EmbeddingEngine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagellm-embed")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs, pooler_config: Any = None) -> AsyncEmbeddingEngine:
        return cls(EmbeddingEngine(args, pooler_config))

    async def start(self) -> None:
        """Starts the batching task on the running loop. Idempotent."""
        if self._task is not None and not self._task.done():
            return
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run_loop(), name="pagellm-embed-loop")

    async def shutdown(self) -> None:
        """Stops the batching task; callers still waiting get an error."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("the embedding engine shut down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs `fn(*args, **kwargs)` on the engine thread (for tokenizer use)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def embed(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Float32 CPU vectors for checked token lists (EmbeddingEngine.process_prompts'), in
        order, computed in a batch with whatever other callers have queued."""
        if self._queue is None or not self.is_running:
            raise RuntimeError("the embedding engine is not running; await start() first")
        future: asyncio.Future[list[torch.Tensor]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(token_ids, future))
        return await future

    async def _run_loop(self) -> None:
        assert self._queue is not None  # set by start()
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # A caller that went away (client disconnect) cancelled its future: skip its work.
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            flat = [ids for p in batch for ids in p.token_ids]
            try:
                vectors = await self.run(self.engine.embed_token_ids, flat)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                logger.exception("embedding batch of %d prompts failed", len(flat))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            start = 0
            for p in batch:
                count = len(p.token_ids)
                if not p.future.done():
                    p.future.set_result(vectors[start:start + count])
                start += count
