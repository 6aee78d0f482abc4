"""OpenAI's error JSON and the exception handlers that produce it.

Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}` with a
status code OpenAI's clients map to an exception class: 400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 500 InternalServerError.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagellm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# The first word of a SamplingParams / InputProcessor message is the field it is about
# ("temperature must be >= 0, got -1"); this pulls it out for the `param` slot.
_FIELD_AT_START = re.compile(r"^([a-z_]+)\b")


class OpenAIError(Exception):
    """An error the client caused (or must hear about), ready to become OpenAI's error JSON."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_ or _default_type(status)

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(exc: ValueError, known_fields: set[str] | None = None) -> OpenAIError:
    """A 400 from a ValueError raised by input validation; `param` is the field it names."""
    message = str(exc)
    match = _FIELD_AT_START.match(message)
    param = match.group(1) if match and (known_fields is None or match.group(1) in known_fields) else None
    return OpenAIError(message, 400, param=param)


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(f"The model `{name}` does not exist.", 404, param="model", code="model_not_found")


def error_json(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.to_response().model_dump(), status_code=error.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line per pydantic error, and the first offending field's name."""
    parts, param = [], None
    for err in exc.errors():
        # loc is ("body", "messages", 0, "content") for a body field; drop the "body".
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON in the request body: {err.get('msg', '')}")
            continue
        field = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        parts.append(f"{field or 'request body'}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Route every error a request can raise to OpenAI's error JSON."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_json(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_json(OpenAIError(message, 400, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_json(OpenAIError(detail, exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return error_json(OpenAIError(f"internal server error: {type(exc).__name__}: {exc}", 500))
