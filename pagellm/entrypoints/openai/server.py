"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncLLMEngine, run by uvicorn."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol, Sequence

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

import pagellm
from pagellm.engine.args import EngineArgs
from pagellm.engine.async_engine import AsyncLLMEngine
from pagellm.entrypoints.openai.auth import APIKeyMiddleware
from pagellm.entrypoints.openai.errors import OpenAIError, install_error_handlers
from pagellm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from pagellm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                 DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                                                 TokenizeResponse)
from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagellm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagellm.pooling.registry import check_generate_model

logger = logging.getLogger("pagellm.server")

API_KEY_ENV = "PAGELLM_API_KEY"
_UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP side runs (the engine's settings are EngineArgs)."""

    host: str | None = None  # None: all interfaces
    port: int = 8000
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ()  # empty: the model's own name
    chat_template: str | None = None  # template text (already read from a file if one was given)
    uvicorn_log_level: str = "info"
    # CORS, as vLLM's flags set it (defaults: any origin, method and header; no credentials).
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535]; got {self.port}")
        if self.uvicorn_log_level not in _UVICORN_LOG_LEVELS:
            raise ValueError(f"uvicorn_log_level must be one of {', '.join(_UVICORN_LOG_LEVELS)}; "
                             f"got {self.uvicorn_log_level!r}")


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a path to a Jinja file, or the template itself inline."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value and (value.endswith((".jinja", ".j2", ".jinja2")) or os.sep in value):
        raise ValueError(f"chat_template: no such file {value!r} (and it does not look like an inline template)")
    return value


class ServedEngine(Protocol):
    """What the shared app needs of an async engine (AsyncLLMEngine and AsyncEmbeddingEngine)."""

    engine: Any  # the synchronous engine: `.model_config`, and `.args` when built from EngineArgs

    @property
    def is_running(self) -> bool: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...


def build_base_app(engine: ServedEngine, config: ServerConfig, names: Sequence[str], title: str) -> FastAPI:
    """The app every server starts from, whatever its task: starting it starts `engine` (and
    stopping it shuts the engine down); errors in OpenAI's format; the API key check when
    `config.api_key` is set; and /health, /ping, /version and /v1/models (listing `names`)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title=title, version=pagellm.__version__, lifespan=lifespan)
    install_error_handlers(app)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    # Added last, so outermost: preflights are answered before the key check, and a 401 carries
    # the CORS headers a browser needs to read it.
    app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                       allow_methods=list(config.allowed_methods), allow_headers=list(config.allowed_headers),
                       allow_credentials=config.allow_credentials)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": pagellm.__version__})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        max_model_len = engine.engine.model_config.max_model_len
        cards = [ModelCard(id=name, root=_model_path(engine), max_model_len=max_model_len) for name in names]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    return app


def add_unsupported_routes(app: FastAPI, apis: Mapping[str, str]) -> None:
    """For each {path: API name}, a POST route that answers 400 "The model does not support
    <API name>": the endpoints of another task than the one the model is served for."""
    for path, api in apis.items():
        app.add_api_route(path, _unsupported(api), methods=["POST"])


def _unsupported(api: str) -> Callable[[], Awaitable[Response]]:
    async def unsupported() -> Response:
        raise OpenAIError(f"The model does not support {api}", 400)

    return unsupported


def build_app(engine: AsyncLLMEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `engine`. Starting the app starts the engine loop."""
    sync = engine.engine
    names = list(config.served_model_names) or [sync.model_config.model]
    metrics = ServerMetrics(names[0])
    engine.observer = metrics
    completions = OpenAIServingCompletion(engine, names, config.chat_template)
    chat = OpenAIServingChat(engine, names, config.chat_template)
    app = build_base_app(engine, config, names, "pagellm OpenAI-compatible server")

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.update_stats(await engine.get_stats())
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        """Drops cached KV blocks that no running request holds (vLLM's endpoint)."""
        await engine.run(engine.engine.reset_prefix_cache)
        return Response(status_code=200)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    # As vLLM answers on a generation model; `--task embed` serves embedding models.
    add_unsupported_routes(app, {"/v1/embeddings": "Embeddings API"})

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> JSONResponse:
        completions.resolve_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError("send exactly one of prompt and messages", 400, param="prompt")
        if request.prompt is not None:
            ids = await completions.tokenize(request.prompt, request.add_special_tokens)
        else:
            _, ids = await completions.render_chat(request.messages or [], request.add_generation_prompt)
        body = TokenizeResponse(count=len(ids), max_model_len=completions.max_model_len, tokens=ids)
        return JSONResponse(body.model_dump(mode="json"))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> JSONResponse:
        completions.resolve_model(request.model)
        vocab = sync.model_config.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(f"tokens must be ids in [0, {vocab}); got {bad}", 400, param="tokens")
        return JSONResponse(DetokenizeResponse(prompt=await completions.decode(request.tokens)).model_dump())

    return app


def _model_path(engine: ServedEngine) -> str:
    """What the user asked to load (a path, or the default model's name)."""
    args = getattr(engine.engine, "args", None)
    return getattr(args, "model", None) or engine.engine.model_config.model


def run_server(engine_args: EngineArgs, config: ServerConfig) -> None:
    """Loads the model, then serves until interrupted (Ctrl-C / SIGTERM)."""
    if engine_args.task == "embed":
        from pagellm.entrypoints.openai.serving_embedding import create_embedding_app

        embedder, app = create_embedding_app(engine_args, config)
        mc = embedder.engine.model_config
        logger.info("embedding model %s (served as %s): max_model_len %d, %d-dimensional vectors",
                    engine_args.model, ", ".join(config.served_model_names) or mc.model, mc.max_model_len,
                    mc.hidden_size)
        serve_app(app, config)
        return
    check_generate_model(engine_args.model)
    engine = AsyncLLMEngine.from_engine_args(engine_args)
    sync = engine.engine
    app = build_app(engine, config)
    names = ", ".join(config.served_model_names) or sync.model_config.model
    logger.info("model %s (served as %s): max_model_len %d, KV cache capacity %d tokens, max_num_seqs %d",
                _model_path(engine), names, sync.model_config.max_model_len, sync.kv_capacity_tokens,
                sync.scheduler_config.max_num_seqs)
    serve_app(app, config)


def serve_app(app: FastAPI, config: ServerConfig) -> None:
    """Runs `app` under uvicorn until interrupted."""
    import uvicorn

    host = config.host or "0.0.0.0"
    logger.info("OpenAI-compatible server on http://%s:%d (API key %s)", host, config.port,
                "required" if config.api_key else "not required")
    # On shutdown, streams still open after a few seconds are cancelled (which aborts their
    # requests) rather than holding the process until they finish.
    uv_config = uvicorn.Config(app, host=host, port=config.port, log_level=config.uvicorn_log_level,
                               timeout_keep_alive=5, timeout_graceful_shutdown=5)
    asyncio.run(uvicorn.Server(uv_config).serve())

