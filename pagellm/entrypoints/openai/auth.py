"""API-key check for the server, as a plain ASGI middleware.

A plain ASGI wrapper (rather than Starlette's BaseHTTPMiddleware) leaves streamed responses
and client-disconnect detection untouched, and rejects a request before its body is read.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable, Iterable

# Probes and monitoring must work without the key (load balancers, Prometheus).
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                   Awaitable[None]]


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every HTTP path except `open_paths`.

    The key is compared with hmac.compare_digest so the time taken does not reveal how
    much of a guess was right.
    """

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = OPEN_PATHS) -> None:
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.app = app
        self._key = api_key.encode("utf-8")
        self._open = frozenset(open_paths)

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            await _reject(send, "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>'.")
            return
        if not hmac.compare_digest(token.strip(), self._key):
            await _reject(send, "Incorrect API key provided.")
            return
        await self.app(scope, receive, send)


async def _reject(send, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "authentication_error", "param": None,
                                 "code": "invalid_api_key"}}).encode("utf-8")
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
