"""CORS for browser clients, and the server-side origin check it cannot replace.

Browsers enforce CORS only when reading a response; a foreign page can still send requests.
So the relay refuses a request whose ``Origin`` is not allowed (``relay.access``), and this
module only answers preflights and labels responses for the origins that are allowed. The
relay's own origin (a page it serves itself, like the demo) is always allowed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from relay.errors import OriginNotAllowed

MAX_AGE_SECONDS = 600
ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, X-Request-ID"
EXPOSE_HEADERS = "X-Request-ID, Retry-After"


def own_origin(request: web.BaseRequest) -> str:
    return f"{request.scheme}://{request.host}"


def allowed_origin(request: web.BaseRequest, allowed: tuple[str, ...]) -> str | None:
    """The request's Origin if it may read responses, else None."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    origin = origin.rstrip("/")
    return origin if origin in allowed or origin == own_origin(request) else None


def preflight(request: web.Request, allowed: tuple[str, ...]) -> web.Response:
    """Answer an ``OPTIONS`` preflight: 204 for allowed origins, the 403 envelope otherwise."""
    if allowed_origin(request, allowed) is None:
        raise OriginNotAllowed(f"origin {request.headers.get('Origin')!r} is not allowed")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(MAX_AGE_SECONDS),
        },
    )


def response_headers(
    allowed: tuple[str, ...],
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An ``on_response_prepare`` callback: CORS headers on every response, streams included."""

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        if "Origin" not in request.headers:
            return
        response.headers.add("Vary", "Origin")
        origin = allowed_origin(request, allowed)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

    return add
