"""Beam search on the server's shared AsyncLLMEngine, without holding up anyone else.

The offline `run_beam_search` owns its engine; a server's engine is busy with other clients.
Here each search step submits one ordinary engine request per live beam (its tokens as the
prompt, max_tokens=1, the top-K logprobs that BeamSearchState asks for), awaits them together
and advances the same BeamSearchState. The engine batches those requests with everyone
else's, so other requests keep running while a search is under way, and the prefix cache
serves each beam's history from the previous step.

Cancelling the search (client disconnect, shutdown) cancels the step's requests, and
AsyncLLMEngine.generate aborts each one it leaves unfinished, freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator

from pagellm.engine.beam_search import BeamSearchOutput, EarlyStopping, expansion_params, new_search_state
from pagellm.outputs import Logprob, RequestOutput
from pagellm.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from pagellm.engine.async_engine import AsyncLLMEngine


async def beam_search_async(engine: AsyncLLMEngine, request_id: str, prompt_token_ids: list[int],
                            params: BeamSearchParams, num_logprobs: int | None = None,
                            early_stopping: EarlyStopping | None = None) -> BeamSearchOutput:
    """The best `params.beam_width` beams for one tokenized prompt, best first (texts unset).

    Step requests are named `{request_id}-beam{step}-{i}`. `num_logprobs` asks each step for
    at least that many alternatives (so the beams' logprob entries can show the client's top
    k). The prompt must already be validated against the KV pool; raises ValueError if it
    leaves no room in the context or the beam width exceeds the vocabulary, EngineStepError if
    the engine fails in a step.
    """
    sync = engine.engine
    vocab = sync.model_config.vocab_size
    state = new_search_state(prompt_token_ids, params, sync.model_config.max_model_len, sync.eos_token_ids,
                             vocab, early_stopping)
    step_params = expansion_params(max(state.num_candidates, num_logprobs or 0), vocab)
    step = 0
    while not state.done:
        expansions = await _expand(engine, f"{request_id}-beam{step}", [beam.tokens for beam in state.running],
                                   step_params)
        state.step(expansions)
        step += 1
    return state.result()


async def _expand(engine: AsyncLLMEngine, step_id: str, sequences: list[list[int]],
                  params: SamplingParams) -> list[dict[int, Logprob]]:
    """Each sequence's next-token logprob entry, its requests run concurrently in the engine."""
    tasks = [asyncio.create_task(_next_token_entry(engine, f"{step_id}-{i}", tokens, params))
             for i, tokens in enumerate(sequences)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        # One failed or we were cancelled: stop the others too, so none keeps its KV blocks.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _next_token_entry(engine: AsyncLLMEngine, request_id: str, tokens: list[int],
                            params: SamplingParams) -> dict[int, Logprob]:
    stream: AsyncIterator[RequestOutput] = engine.generate(request_id, {"prompt_token_ids": tokens}, params,
                                                           validated=(None, tokens))
    final: RequestOutput | None = None
    try:
        async for out in stream:
            final = out
    finally:
        # Leaving early (cancelled) closes the generator, which aborts the request.
        await stream.aclose()  # type: ignore[attr-defined]
    if final is None or not final.outputs or not final.outputs[0].logprobs:
        raise RuntimeError(f"beam step request {request_id} ended without a token")
    return final.outputs[0].logprobs[0]
