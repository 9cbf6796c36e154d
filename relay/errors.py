"""The errors the relay itself produces, each with its HTTP status and ``data.error`` code.

::

    RelayError                      (rendered as the WaveSpeed envelope, before headers only)
    ├── BadRequest               400 bad_request
    ├── Unauthorized             401 unauthorized
    ├── ModelNotAllowed          403 model_not_allowed
    ├── OriginNotAllowed         403 origin_not_allowed
    ├── NotFound                 404 not_found
    ├── MethodNotAllowed         405 method_not_allowed
    ├── RequestTimeout           408 request_timeout     (the body stopped arriving)
    ├── PayloadTooLarge          413 payload_too_large
    ├── RateLimited              429 rate_limited        (Retry-After)
    ├── UpstreamUnavailable      502 upstream_unavailable
    ├── Overloaded               503 overloaded          (Retry-After)
    ├── ShuttingDown             503 shutting_down       (Retry-After)
    └── UpstreamTimeout          504 upstream_timeout

After headers a failure is never rendered: the handler aborts the client connection.

This module imports nothing from aiohttp: the renderer lives in ``relay.app`` and the one
translator of client exceptions in ``relay.upstream``.
"""

from __future__ import annotations

import json
from typing import ClassVar


class RelayError(Exception):
    """An error answered with the WaveSpeed envelope ``{"code", "message", "data"}``."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def envelope(self) -> bytes:
        body = {"code": self.status, "message": self.message, "data": {"error": self.code}}
        return json.dumps(body, separators=(",", ":")).encode()

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(self.retry_after)}


class BadRequest(RelayError):
    status, code = 400, "bad_request"


class Unauthorized(RelayError):
    status, code = 401, "unauthorized"


class ModelNotAllowed(RelayError):
    status, code = 403, "model_not_allowed"


class OriginNotAllowed(RelayError):
    status, code = 403, "origin_not_allowed"


class NotFound(RelayError):
    status, code = 404, "not_found"


class MethodNotAllowed(RelayError):
    status, code = 405, "method_not_allowed"

    def __init__(self, message: str, *, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}


class RequestTimeout(RelayError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(RelayError):
    status, code = 413, "payload_too_large"


class RateLimited(RelayError):
    status, code = 429, "rate_limited"


class UpstreamUnavailable(RelayError):
    status, code = 502, "upstream_unavailable"


class Overloaded(RelayError):
    status, code = 503, "overloaded"


class ShuttingDown(RelayError):
    status, code = 503, "shutting_down"


class UpstreamTimeout(RelayError):
    status, code = 504, "upstream_timeout"
