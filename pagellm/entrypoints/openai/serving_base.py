"""What the completion and chat handlers share: model names, tokenizing on the engine thread,
the context-length check, request ids, SSE framing and client-disconnect handling."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, AsyncIterator, Awaitable, Mapping, Sequence, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from pagellm.engine.async_engine import AsyncLLMEngine, EngineStepError
from pagellm.entrypoints.openai.errors import OpenAIError, bad_request, model_not_found
from pagellm.entrypoints.openai.protocol import ChatMessage, SamplingFields
from pagellm.sampling_params import SamplingParams, generation_config_defaults

T = TypeVar("T")

# OpenAI's error code for a prompt (plus max_tokens) longer than the context.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class ClientDisconnected(Exception):
    """The client went away before its (non-streamed) answer was ready."""


class OpenAIServing:
    """State and helpers common to the OpenAI endpoints. Engine attributes read here
    (configs, generation defaults) are immutable after start-up, so the event loop may read
    them; anything that touches the tokenizer goes through `engine.run`."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str],
                 chat_template: str | None = None) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must name at least one model")
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.chat_template = chat_template
        sync = engine.engine
        self.max_model_len: int = sync.model_config.max_model_len
        self.default_params = sync.default_sampling_params()
        # max_new_tokens from generation_config.json caps a request that sets no max_tokens.
        use_model_defaults = sync.model_config.generation_config == "auto"
        self.model_max_tokens: int | None = (generation_config_defaults(sync.generation_config).get("max_tokens")
                                             if use_model_defaults else None)

    # ---- requests ----------------------------------------------------------------------------
    def resolve_model(self, requested: str | None) -> str:
        """The name to report for a request; 404 if it asks for a model not served here."""
        if requested is None or requested == "":
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise model_not_found(requested)
        return requested

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def max_tokens_left(self, num_prompt_tokens: int) -> int:
        """Default max_tokens when the client sets none: the rest of the context, capped by
        the model's max_new_tokens if it has one."""
        left = self.max_model_len - num_prompt_tokens
        if self.model_max_tokens is not None:
            left = min(left, int(self.model_max_tokens))
        return left

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None, prompt_param: str = "messages",
                      max_tokens_param: str = "max_tokens") -> None:
        """400 with both lengths when the prompt plus the completion cannot fit the context;
        `param` names the request field (as the client sent it) that is too long, and `code`
        is OpenAI's "context_length_exceeded"."""
        limit = self.max_model_len
        if max_tokens is None or num_prompt_tokens >= limit:
            if num_prompt_tokens >= limit:
                raise OpenAIError(
                    f"This model's maximum context length is {limit} tokens. However, your request has "
                    f"{num_prompt_tokens} input tokens. Please reduce the length of the input messages.",
                    400, param=prompt_param, code=CONTEXT_LENGTH_EXCEEDED)
            return
        if num_prompt_tokens + max_tokens > limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in "
                f"the completion). Please reduce the length of the messages or completion.",
                400, param=max_tokens_param, code=CONTEXT_LENGTH_EXCEEDED)

    # ---- engine-thread helpers ----------------------------------------------------------------
    # The tokenizer is not thread-safe (its Rust core refuses concurrent mutable use), so
    # these sync helpers run only inside `engine.run`; a handler batches all of its
    # preparation into one such call, so it waits for at most one engine step.

    def encode_sync(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode_sync(self, token_ids: list[int]) -> str:
        return self.engine.engine.tokenizer.decode(token_ids)

    def render_chat_sync(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
                         continue_final_message: bool = False,
                         chat_template_kwargs: Mapping[str, Any] | None = None) -> tuple[str, list[int]]:
        """The conversation rendered by the chat template, and its token ids. 400 on a bad
        conversation or a template that rejects it."""
        plain = [_message_dict(m) for m in messages]
        inputs = self.engine.engine.inputs
        try:
            text = inputs.render_chat(plain, self.chat_template, add_generation_prompt, continue_final_message,
                                      chat_template_kwargs)
        except ValueError as exc:
            raise bad_request(exc) from exc
        except Exception as exc:  # jinja2 TemplateError and friends: the conversation was rejected
            raise OpenAIError(f"the chat template could not render these messages: {exc}", 400,
                              param="messages") from exc
        return text, inputs.encode_chat(text)

    def validate_sync(self, prompt: Mapping[str, Any], params: SamplingParams) -> None:
        """LLMEngine.validate (KV fit, token ids, ...) as a 400."""
        try:
            self.engine.engine.validate(prompt, params)
        except ValueError as exc:
            raise bad_request(exc) from exc

    # ---- async wrappers for the small endpoints -------------------------------------------------
    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.engine.run(self.encode_sync, text, add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        return await self.engine.run(self.decode_sync, token_ids)

    async def render_chat(self, messages: Sequence[ChatMessage],
                          add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        return await self.engine.run(self.render_chat_sync, messages, add_generation_prompt)


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.type != "text":
                raise OpenAIError(f"only text content parts are supported; got a part of type {part.type!r}", 400,
                                  param="messages")
            parts.append({"type": "text", "text": part.text or ""})
        content = parts
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    return out


def prompt_list(value: str | list[str] | list[int] | list[list[int]], field: str) -> list[str | list[int]]:
    """A request's prompts from its `field`: one string, one token-id list, or a list of either."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise OpenAIError(f"{field} must not be empty", 400, param=field)
    if all(isinstance(t, int) for t in value):
        return [list(value)]  # type: ignore[arg-type]  # one tokenized prompt
    return list(value)  # type: ignore[arg-type]


# ---- streaming and disconnects -------------------------------------------------------------


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def continuous_usage(request: SamplingFields) -> bool:
    """Whether every chunk of a stream carries the usage so far: vLLM's
    `stream_options.continuous_usage_stats`, which takes effect only with `include_usage`."""
    options = request.stream_options
    return bool(options is not None and options.include_usage and options.continuous_usage_stats)


def stream_error(exc: BaseException) -> str:
    """An error inside an already-started stream, as OpenAI sends it: an `error` event."""
    if isinstance(exc, OpenAIError):
        return sse(exc.to_response())
    message = str(exc) if isinstance(exc, EngineStepError) else f"internal server error: {type(exc).__name__}: {exc}"
    return sse(OpenAIError(message, 500).to_response())


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yields (stream index, item) from several async iterators as items arrive; closes all
    of them (aborting their requests) when the consumer stops early or fails."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await _aclose(streams[0])
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None, False))
            await queue.put((index, None, None, True))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, exc, True))
        finally:
            await _aclose(stream)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _aclose(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def _wait_for_disconnect(request: Request) -> None:
    # FastAPI has read the body already, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (which aborts its engine requests) if the client
    disconnects first; then raises ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise ClientDisconnected()



async def await_unstreamed(request: Request, work: Awaitable[T]) -> T | Response:
    """The result of a non-streamed request's `work`; a 499 response if the client went away
    (its engine requests are aborted); an OpenAI 500 error if the engine step failed."""
    try:
        return await cancel_on_disconnect(request, work)
    except ClientDisconnected:
        return Response(status_code=499)
    except EngineStepError as exc:
        raise OpenAIError(str(exc), 500) from exc
