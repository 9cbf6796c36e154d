"""CORS for browser clients, and the server-side origin check it cannot replace.

Browsers enforce CORS only when reading a response; a foreign page can still send requests.
So the relay refuses a request whose ``Origin`` is not allowed (``relay.access``), and this
module only answers preflights and labels responses for the origins that are allowed. The
relay's own origin (a page it serves itself, like the demo) is always allowed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from relay.errors import OriginNotAllowed

MAX_AGE_SECONDS = 600
ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, X-Request-ID"
EXPOSE_HEADERS = "X-Request-ID, Retry-After"


class Incoming(Protocol):
    """What CORS reads of a request: aiohttp's, or one on the relay's front."""

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def scheme(self) -> str: ...
    @property
    def host(self) -> str: ...


def own_origin(request: Incoming) -> str:
    return f"{request.scheme}://{request.host}"


def allowed_origin(request: Incoming, allowed: tuple[str, ...]) -> str | None:
    """The request's Origin if it may read responses, else None."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    origin = origin.rstrip("/")
    return origin if origin in allowed or origin == own_origin(request) else None


def preflight(request: Incoming, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """The headers of an ``OPTIONS`` preflight's 204 for an allowed origin; else the 403."""
    if allowed_origin(request, allowed) is None:
        raise OriginNotAllowed(f"origin {request.headers.get('Origin')!r} is not allowed")
    return [
        ("Access-Control-Allow-Methods", ALLOW_METHODS),
        ("Access-Control-Allow-Headers", ALLOW_HEADERS),
        ("Access-Control-Max-Age", str(MAX_AGE_SECONDS)),
    ]


def labels(request: Incoming, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """The CORS header fields a response to ``request`` carries (none without an Origin)."""
    if "Origin" not in request.headers:
        return []
    origin = allowed_origin(request, allowed)
    if origin is None:
        return [("Vary", "Origin")]
    return [
        ("Vary", "Origin"),
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Expose-Headers", EXPOSE_HEADERS),
    ]


def label(request: Incoming, headers: CIMultiDict[str], allowed: tuple[str, ...]) -> None:
    """Add the CORS header fields of :func:`labels` to a response's ``headers``."""
    for name, value in labels(request, allowed):
        if name == "Vary":
            headers.add(name, value)  # beside the upstream's own Vary, if any
        else:
            headers[name] = value


def response_headers(
    allowed: tuple[str, ...],
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An ``on_response_prepare`` callback: CORS on the responses aiohttp serves."""

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        label(request, response.headers, allowed)

    return add
