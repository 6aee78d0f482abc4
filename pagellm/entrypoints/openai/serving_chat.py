"""POST /v1/chat/completions: messages through the chat template, streamed or not, sampled or
beam-searched (`use_beam_search`)."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagellm.engine.async_engine import EngineStepError
from pagellm.entrypoints.openai.errors import OpenAIError
from pagellm.entrypoints.openai.logprobs import chat_logprobs, prompt_logprobs_json
from pagellm.entrypoints.openai.protocol import (ChatChoice, ChatChoiceLogprobs, ChatCompletionChunk,
                                                 ChatCompletionRequest, ChatCompletionResponse, ChatResponseMessage,
                                                 ChatStreamChoice, DeltaMessage, UsageInfo)
from pagellm.entrypoints.openai.request_params import build_beam_search_params, build_sampling_params
from pagellm.entrypoints.openai.serving_base import (SSE_DONE, OpenAIServing, await_unstreamed,
                                                     continuous_usage, merge_streams, sse, stream_error)
from pagellm.entrypoints.openai.text_stream import TextDeltaStream
from pagellm.outputs import CompletionOutput, RequestOutput
from pagellm.sampling_params import BeamSearchParams, SamplingParams

# What shapes the text of a beam: no stop strings (beam search refuses them).
_BEAM_TEXT_PARAMS = SamplingParams()


class OpenAIServingChat(OpenAIServing):
    """The chat completions endpoint."""

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        arrival = time.time()
        model = self.resolve_model(request.model)
        params, text, ids = await self.engine.run(self._prepare, request)
        request_id = self.new_id("chatcmpl")
        stream: AsyncIterator[RequestOutput]
        if isinstance(params, BeamSearchParams):
            # vLLM's shape: one finished output holding every beam, streamed only once it is done.
            stream = self.engine.beam_search(request_id, text, ids, params, _num_logprobs(request),
                                             request.skip_special_tokens)
        else:
            stream = self.engine.generate(request_id, {"prompt": text, "prompt_token_ids": ids}, params, arrival,
                                          validated=(text, ids))
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, model, params, len(ids), stream),
                                     media_type="text/event-stream")
        final = await await_unstreamed(raw_request, _last(stream))
        if isinstance(final, Response):
            return final
        return JSONResponse(self._response(request, request_id, model, final).model_dump(mode="json"))

    def _prepare(self, request: ChatCompletionRequest) -> tuple[SamplingParams | BeamSearchParams, str, list[int]]:
        """Renders, tokenizes and checks the request (on the engine thread). Raises OpenAIError(400)."""
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("stream_options is only allowed when stream is true", 400, param="stream_options")
        if not request.messages:
            raise OpenAIError("messages must not be empty", 400, param="messages")
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs requires logprobs to be true", 400, param="top_logprobs")
        text, ids = self.render_chat_sync(request.messages, request.add_generation_prompt,
                                          request.continue_final_message, request.chat_template_kwargs)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        # Errors name the field the client sent: the newer max_completion_tokens wins.
        max_tokens_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        field_names = {"logprobs": "top_logprobs", "max_tokens": max_tokens_field}
        self.check_context(len(ids), max_tokens, max_tokens_param=max_tokens_field)
        if max_tokens is None:
            max_tokens = self.max_tokens_left(len(ids))
        logprobs = _num_logprobs(request)
        if request.use_beam_search:
            params = build_beam_search_params(request, max_tokens, logprobs, field_names={"logprobs": "top_logprobs"})
            # Each beam grows like one sequence of this length: check that it fits the KV pool.
            self.validate_sync({"prompt": text, "prompt_token_ids": ids},
                               SamplingParams(max_tokens=max_tokens, ignore_eos=request.ignore_eos))
            return params, text, ids
        sampling = build_sampling_params(request, self.default_params, max_tokens, logprobs, request.prompt_logprobs,
                                         field_names=field_names)
        self.validate_sync({"prompt": text, "prompt_token_ids": ids}, sampling)
        return sampling, text, ids

    def _logprobs(self, request: ChatCompletionRequest, c: CompletionOutput, start: int,
                  end: int) -> ChatChoiceLogprobs | None:
        if not request.logprobs:
            return None
        # `end` comes from the token ids snapshot: the engine thread may already have appended
        # to the shared logprobs list.
        content = chat_logprobs(c.token_ids[start:end], (c.logprobs or [])[start:end], request.top_logprobs or 0)
        return ChatChoiceLogprobs(content=content)

    def _response(self, request: ChatCompletionRequest, request_id: str, model: str,
                  out: RequestOutput) -> ChatCompletionResponse:
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=self._logprobs(request, c, 0, len(c.token_ids)),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in out.outputs]
        prompt_tokens = len(out.prompt_token_ids)
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        usage = UsageInfo.of(prompt_tokens, completion_tokens)
        prompt_logprobs = prompt_logprobs_json(out.prompt_logprobs) if request.prompt_logprobs is not None else None
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage,
                                      prompt_logprobs=prompt_logprobs)

    async def _stream(self, request: ChatCompletionRequest, request_id: str, model: str,
                      params: SamplingParams | BeamSearchParams, num_prompt_tokens: int,
                      stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        created = int(time.time())
        if isinstance(params, BeamSearchParams):
            n, text_params = params.beam_width, _BEAM_TEXT_PARAMS
        else:
            n, text_params = params.n, params

        with_usage = continuous_usage(request)

        def chunk(choice: ChatStreamChoice, completion_tokens: int) -> str:
            usage = UsageInfo.of(num_prompt_tokens, completion_tokens) if with_usage else None
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice], usage=usage))

        texts = [TextDeltaStream(text_params) for _ in range(n)]
        sent_tokens = [0] * n
        done = [False] * n
        try:
            # The role goes first, before any token, as OpenAI's stream does.
            for index in range(n):
                yield chunk(ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")), 0)
            async for _, out in merge_streams([stream]):
                for c in out.outputs:
                    if done[c.index]:
                        continue
                    finished = c.finish_reason is not None
                    text = texts[c.index].delta(c.text, finished)
                    if not text and not finished:
                        continue  # held back: it may be the start of a stop string
                    end = len(c.token_ids)
                    logprobs = self._logprobs(request, c, sent_tokens[c.index], end)
                    sent_tokens[c.index] = end
                    done[c.index] = finished
                    yield chunk(ChatStreamChoice(index=c.index, delta=DeltaMessage(content=text or None),
                                                 logprobs=logprobs, finish_reason=c.finish_reason,
                                                 stop_reason=c.stop_reason), end)
            if request.stream_options is not None and request.stream_options.include_usage:
                usage = UsageInfo.of(num_prompt_tokens, sum(sent_tokens))
                yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=usage))
        except Exception as exc:  # noqa: BLE001 - the stream has started; report in-band
            yield stream_error(exc)
        yield SSE_DONE


def _num_logprobs(request: ChatCompletionRequest) -> int | None:
    """Top alternatives per token the client asked for (None: no logprobs)."""
    return (request.top_logprobs or 0) if request.logprobs else None


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for _, out in merge_streams([stream]):
        final = out
    if final is None:
        raise EngineStepError("the request ended without output")
    return final
