"""The server for embedding models (`pagellm serve MODEL --task embed`): POST /v1/embeddings in
OpenAI's wire format, plus /v1/models, /tokenize, /detokenize, /health, /ping and /version.

Requests from all clients meet in the AsyncEmbeddingEngine's queue and run in shared batches.
The generation endpoints answer 400, as vLLM's do for a pooling model.
"""

from __future__ import annotations

import base64
from typing import Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pagellm.engine.args import EngineArgs
from pagellm.entrypoints.openai.errors import OpenAIError, model_not_found
from pagellm.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse, EmbeddingData,
                                                 EmbeddingRequest, EmbeddingResponse, TokenizeRequest,
                                                 TokenizeResponse, UsageInfo)
from pagellm.entrypoints.openai.server import ServerConfig, add_unsupported_routes, build_base_app
from pagellm.entrypoints.openai.serving_base import OpenAIServing, await_unstreamed, prompt_list
from pagellm.pooling.async_engine import AsyncEmbeddingEngine

# The first words of EmbeddingEngine.process_prompts' errors -> the request field they are about.
_PARAM_OF_MESSAGE = (("truncate_prompt_tokens", "truncate_prompt_tokens"),)


class OpenAIServingEmbedding:
    """POST /v1/embeddings over an AsyncEmbeddingEngine."""

    def __init__(self, engine: AsyncEmbeddingEngine, served_model_names: Sequence[str]) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must name at least one model")
        self.engine = engine
        self.served_model_names = list(served_model_names)
        config = engine.engine.model_config
        self.max_model_len = config.max_model_len
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size

    def resolve_model(self, requested: str | None) -> str:
        """The name to report; 404 for a model not served here."""
        if not requested:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise model_not_found(requested)
        return requested

    async def create_embedding(self, request: EmbeddingRequest, raw_request: Request) -> Response:
        model = self.resolve_model(request.model)
        if request.dimensions is not None and request.dimensions != self.hidden_size:
            raise OpenAIError(f"dimensions must be {self.hidden_size} (this model's embedding size) or unset; "
                              f"got {request.dimensions}: the model has no matryoshka representation",
                              400, param="dimensions")
        prompts = prompt_list(request.input, "input")
        token_ids = await self.engine.run(self._process_sync, prompts, request.truncate_prompt_tokens,
                                          request.add_special_tokens)
        vectors = await await_unstreamed(raw_request, self.engine.embed(token_ids))
        if isinstance(vectors, Response):
            return vectors
        encode = _base64 if request.encoding_format == "base64" else _floats
        num_tokens = sum(len(ids) for ids in token_ids)
        body = EmbeddingResponse(
            id=OpenAIServing.new_id("embd"), model=model,
            data=[EmbeddingData(index=i, embedding=encode(v)) for i, v in enumerate(vectors)],
            usage=UsageInfo.of(num_tokens))
        return JSONResponse(body.model_dump(mode="json"))

    def _process_sync(self, prompts: list[str | list[int]], truncate_prompt_tokens: int | None,
                      add_special_tokens: bool) -> list[list[int]]:
        """Token ids of every prompt (on the engine thread); 400 naming the field for a bad one."""
        try:
            processed = self.engine.engine.process_prompts(prompts, truncate_prompt_tokens, add_special_tokens)
        except ValueError as exc:
            message = str(exc)
            param = next((p for prefix, p in _PARAM_OF_MESSAGE if message.startswith(prefix)), "input")
            if param == "input":
                index = getattr(exc, "index", 0)
                message = (f"input[{index}]: " if len(prompts) > 1 else "input: ") + message
            raise OpenAIError(message, 400, param=param) from exc
        return [ids for _, ids in processed]

    # ---- tokenizer endpoints -----------------------------------------------------------------------
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.resolve_model(request.model)
        if request.messages is not None or request.prompt is None:
            raise OpenAIError("an embedding model tokenizes a prompt, not chat messages: send prompt", 400,
                              param="prompt")
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None:
            raise OpenAIError("the server runs without a tokenizer", 400, param="prompt")
        ids = await self.engine.run(tokenizer.encode, request.prompt, add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=list(ids))

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.resolve_model(request.model)
        bad = next((t for t in request.tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise OpenAIError(f"tokens must be ids in [0, {self.vocab_size}); got {bad}", 400, param="tokens")
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None:
            raise OpenAIError("the server runs without a tokenizer", 400, param="tokens")
        return DetokenizeResponse(prompt=await self.engine.run(tokenizer.decode, request.tokens))




def _floats(vector: torch.Tensor) -> list[float]:
    return vector.tolist()


def _base64(vector: torch.Tensor) -> str:
    """OpenAI's base64 encoding: the float32 values as little-endian bytes."""
    return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode("ascii")


def build_embedding_app(engine: AsyncEmbeddingEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving an embedding model. Starting the app starts the batching loop."""
    sync = engine.engine
    names = list(config.served_model_names) or [sync.model_config.model]
    serving = OpenAIServingEmbedding(engine, names)
    app = build_base_app(engine, config, names, "pagellm OpenAI-compatible server (embeddings)")

    @app.post("/v1/embeddings")
    async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Response:
        return await serving.create_embedding(request, raw_request)

    add_unsupported_routes(app, {"/v1/completions": "Completions API", "/v1/chat/completions": "Chat Completions API"})

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> JSONResponse:
        return JSONResponse((await serving.tokenize(request)).model_dump(mode="json"))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> JSONResponse:
        return JSONResponse((await serving.detokenize(request)).model_dump(mode="json"))

    return app


def create_embedding_app(engine_args: EngineArgs, config: ServerConfig) -> tuple[AsyncEmbeddingEngine, FastAPI]:
    """Loads the model (blocking) and builds its app."""
    engine = AsyncEmbeddingEngine.from_engine_args(engine_args)
    return engine, build_embedding_app(engine, config)
