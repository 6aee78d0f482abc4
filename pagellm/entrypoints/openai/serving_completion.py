"""POST /v1/completions: one or many prompts (text or token ids), streamed or not, sampled or
beam-searched (`use_beam_search`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagellm.entrypoints.openai.errors import OpenAIError
from pagellm.entrypoints.openai.logprobs import CompletionLogprobsBuilder, prompt_logprobs_json
from pagellm.entrypoints.openai.protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest,
                                                 CompletionResponse, UsageInfo)
from pagellm.entrypoints.openai.request_params import build_beam_search_params, build_sampling_params
from pagellm.entrypoints.openai.serving_base import (SSE_DONE, OpenAIServing, await_unstreamed,
                                                     continuous_usage, merge_streams, prompt_list, sse,
                                                     stream_error)
from pagellm.entrypoints.openai.text_stream import TextDeltaStream
from pagellm.outputs import CompletionOutput, RequestOutput
from pagellm.sampling_params import BeamSearchParams, SamplingParams

# What shapes the text of a beam: no stop strings (beam search refuses them).
_BEAM_TEXT_PARAMS = SamplingParams()


@dataclass
class _Prompt:
    """One prompt of the request, tokenized and checked."""

    text: str | None  # None for token-id prompts unless echo needs their text
    token_ids: list[int]
    params: SamplingParams | BeamSearchParams  # BeamSearchParams with use_beam_search
    first_token_text: str = ""  # the text of token 0, for echoed logprobs
    # echo with max_tokens 0: the answer is the prompt alone (how clients score a prompt).
    # The engine still generates one token, which the answer leaves out.
    echo_only: bool = False

    @property
    def text_params(self) -> SamplingParams:
        """The params that decide how the streamed text is cut (stop strings)."""
        return self.params if isinstance(self.params, SamplingParams) else _BEAM_TEXT_PARAMS

    def visible(self, c: CompletionOutput) -> CompletionOutput:
        """What the answer shows of `c`: all of it, or for `echo_only` none of its tokens
        (finished for "length": max_tokens 0 was reached)."""
        if not self.echo_only:
            return c
        return replace(c, text="", token_ids=[], logprobs=[] if c.logprobs is not None else None,
                       finish_reason="length" if c.finish_reason is not None else None, stop_reason=None)


@dataclass
class _ChoiceState:
    """Where one streamed choice stands."""

    text: TextDeltaStream
    logprobs: CompletionLogprobsBuilder | None
    tokens_sent: int = 0
    echoed: bool = False
    done: bool = False
    num_tokens: int = 0


class OpenAIServingCompletion(OpenAIServing):
    """The legacy completions endpoint."""

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        arrival = time.time()
        model = self.resolve_model(request.model)
        self._check_unsupported(request)
        prompts = await self.engine.run(self._prepare_prompts, request)
        request_id = self.new_id("cmpl")
        streams = [self._start(request, f"{request_id}-{i}", p, arrival) for i, p in enumerate(prompts)]
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, model, prompts, streams),
                                     media_type="text/event-stream")
        finals = await await_unstreamed(raw_request, _collect(streams))
        if isinstance(finals, Response):
            return finals
        return JSONResponse(self._response(request, request_id, model, prompts, finals).model_dump(mode="json"))

    def _start(self, request: CompletionRequest, request_id: str, prompt: _Prompt,
               arrival: float) -> AsyncIterator[RequestOutput]:
        """One prompt's outputs: the engine's as they come, or a beam search's single final one
        (vLLM streams beam search only once it is done)."""
        if isinstance(prompt.params, BeamSearchParams):
            return self.engine.beam_search(request_id, prompt.text, prompt.token_ids, prompt.params,
                                           request.logprobs, request.skip_special_tokens)
        return self.engine.generate(request_id, {"prompt": prompt.text, "prompt_token_ids": prompt.token_ids},
                                    prompt.params, arrival, validated=(prompt.text, prompt.token_ids))

    # ---- input --------------------------------------------------------------------------------
    @staticmethod
    def _check_unsupported(request: CompletionRequest) -> None:
        if request.suffix:
            raise OpenAIError("suffix is not supported", 400, param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise OpenAIError(f"best_of must equal n ({request.n}) or be omitted; best_of > n is not supported",
                              400, param="best_of")
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("stream_options is only allowed when stream is true", 400, param="stream_options")
        if request.use_beam_search and request.echo and request.logprobs is not None:
            raise OpenAIError("logprobs with echo needs the prompt's logprobs, which beam search does not compute",
                              400, param="logprobs")

    def _prepare_prompts(self, request: CompletionRequest) -> list[_Prompt]:
        """Tokenizes and checks every prompt (on the engine thread). Raises OpenAIError(400)."""
        # An explicit "max_tokens": null asks for the rest of the context (vLLM); absent means 16.
        to_context = "max_tokens" in request.model_fields_set and request.max_tokens is None
        echo_only = bool(request.echo) and request.max_tokens == 0
        want_prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:
            want_prompt_logprobs = max(want_prompt_logprobs or 0, request.logprobs)
        prompts = []
        for prompt in prompt_list(request.prompt, "prompt"):
            text = prompt if isinstance(prompt, str) else None
            ids = self.encode_sync(prompt) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise OpenAIError("prompt must not be empty", 400, param="prompt")
            max_tokens = self.max_tokens_left(len(ids)) if to_context else request.max_tokens
            if echo_only:
                max_tokens = 1  # the engine needs at least one; `visible` drops it
            self.check_context(len(ids), max_tokens, prompt_param="prompt")
            params: SamplingParams | BeamSearchParams
            if request.use_beam_search:
                params = build_beam_search_params(request, max_tokens, request.logprobs)
                # Each beam grows like one sequence of this length: check that it fits the KV pool.
                self.validate_sync({"prompt": text, "prompt_token_ids": ids},
                                   SamplingParams(max_tokens=max_tokens, ignore_eos=request.ignore_eos))
            else:
                params = build_sampling_params(request, self.default_params, max_tokens, request.logprobs,
                                               want_prompt_logprobs)
                self.validate_sync({"prompt": text, "prompt_token_ids": ids}, params)
            entry = _Prompt(text, ids, params, echo_only=echo_only)
            if request.echo:
                if entry.text is None:
                    entry.text = self.decode_sync(ids)
                if request.logprobs is not None:
                    entry.first_token_text = self.decode_sync(ids[:1])
            prompts.append(entry)
        return prompts

    # ---- non-streamed -------------------------------------------------------------------------
    def _response(self, request: CompletionRequest, request_id: str, model: str, prompts: list[_Prompt],
                  finals: list[RequestOutput]) -> CompletionResponse:
        choices, completion_tokens = [], 0
        for i, (prompt, out) in enumerate(zip(prompts, finals)):
            for c in map(prompt.visible, out.outputs):
                completion_tokens += len(c.token_ids)
                text = c.text
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs(request, prompt, out, c, CompletionLogprobsBuilder(request.logprobs),
                                              with_prompt=bool(request.echo), end=len(c.token_ids))
                if request.echo:
                    text = (prompt.text or "") + text
                choices.append(CompletionChoice(
                    index=i * request.n + c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs) if request.prompt_logprobs is not None
                    else None))
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        usage = UsageInfo.of(prompt_tokens, completion_tokens)
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    @staticmethod
    def _logprobs(request: CompletionRequest, prompt: _Prompt, out: RequestOutput, c: CompletionOutput,
                  builder: CompletionLogprobsBuilder, with_prompt: bool, end: int, start: int = 0) -> CompletionLogProbs:
        """Logprobs of output tokens [start, end), preceded by the prompt's when `with_prompt`."""
        ids: list[int] = []
        entries: list = []
        if with_prompt:
            ids += prompt.token_ids
            entries += list(out.prompt_logprobs or [None] * len(prompt.token_ids))
        # `end` comes from the token ids snapshot: the engine thread may already have appended
        # to the shared logprobs list.
        ids += c.token_ids[start:end]
        entries += (c.logprobs or [])[start:end]
        return builder.build(ids, entries, prompt.first_token_text)

    # ---- streamed -----------------------------------------------------------------------------
    async def _stream(self, request: CompletionRequest, request_id: str, model: str, prompts: list[_Prompt],
                      streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        created = int(time.time())
        states: dict[tuple[int, int], _ChoiceState] = {}
        with_usage = continuous_usage(request)
        try:
            async for i, out in merge_streams(streams):
                prompt = prompts[i]
                for c in out.outputs:
                    state = states.get((i, c.index))
                    if state is None:
                        builder = CompletionLogprobsBuilder(request.logprobs) if request.logprobs is not None else None
                        state = states[(i, c.index)] = _ChoiceState(TextDeltaStream(prompt.text_params), builder)
                    if state.done:
                        continue
                    chunk = self._chunk(request, prompt, out, prompt.visible(c), state,
                                        index=i * request.n + c.index)
                    if chunk is not None:
                        usage = UsageInfo.of(len(prompt.token_ids), state.num_tokens) if with_usage else None
                        yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[chunk],
                                                     usage=usage))
            if request.stream_options is not None and request.stream_options.include_usage:
                prompt_tokens = sum(len(p.token_ids) for p in prompts)
                usage = UsageInfo.of(prompt_tokens, sum(s.num_tokens for s in states.values()))
                yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        except Exception as exc:  # noqa: BLE001 - the stream has started; report in-band
            yield stream_error(exc)
        yield SSE_DONE

    def _chunk(self, request: CompletionRequest, prompt: _Prompt, out: RequestOutput, c: CompletionOutput,
               state: _ChoiceState, index: int) -> CompletionChoice | None:
        finished = c.finish_reason is not None
        end = len(c.token_ids)
        text = state.text.delta(c.text, finished)
        echo_now = bool(request.echo) and not state.echoed
        if not text and not finished and not echo_now:
            return None  # nothing to show yet (held back for a possible stop string)
        logprobs = None
        if state.logprobs is not None:
            logprobs = self._logprobs(request, prompt, out, c, state.logprobs, with_prompt=echo_now, end=end,
                                      start=state.tokens_sent)
        if echo_now:
            text = (prompt.text or "") + text
            state.echoed = True
        state.tokens_sent = end
        state.num_tokens = end
        state.done = finished
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)


async def _collect(streams: Sequence[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merge_streams(streams):
        finals[i] = out
    return finals  # type: ignore[return-value]
