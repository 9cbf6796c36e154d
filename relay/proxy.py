"""The relay handler: validate -> open the upstream -> prepare -> pump -> classify.

Everything that can be refused is refused before the upstream is contacted. Relay errors
are raised (and rendered as the envelope by the app's middleware) only while nothing has
been sent; once the response is prepared, any failure aborts the client connection so a
cut stream never looks complete. The outcome is classified in exactly one ``finally``.
"""

from __future__ import annotations

import asyncio

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from relay import cors, headers, policy
from relay.errors import (
    ModelNotAllowed,
    NotFound,
    PayloadTooLarge,
    RelayError,
    ShuttingDown,
    UpstreamTimeout,
)
from relay.exchange import (
    CLIENT_CLOSED,
    COMPLETED,
    SHUTDOWN,
    TTFB_TIMEOUT,
    UPSTREAM_ERROR,
    Exchange,
)
from relay.ownership import SubmissionTap
from relay.pump import ChunkTap, Watchdog, pump
from relay.sse import SseTap
from relay.state import EXCHANGE, STATE, AppState
from relay.upstream import map_upstream_errors

logger = structlog.get_logger("relay.proxy")


async def relay(request: web.Request) -> web.StreamResponse:
    """Relay one request under ``/api/v3/`` to the upstream."""
    state = request.app[STATE]
    exchange = request[EXCHANGE]
    if request.method == "OPTIONS":
        exchange.route = "preflight"
        return cors.preflight(request, state.config.allowed_origins)
    principal = state.gate.identify(request)
    exchange.client = principal.id
    target = policy.resolve(request.method, request.raw_path)
    exchange.route = target.route
    if target.model != policy.POLLING_MODEL:
        exchange.requested_model = target.model
        if not (state.allowlist.allows(target.model) and principal.may_use(target.model)):
            raise ModelNotAllowed(f"model {target.model!r} is not allowed by this relay")
    exchange.model = target.model
    if state.draining:
        raise ShuttingDown("the relay is shutting down", retry_after=1)

    lease = await state.gate.admit(principal, target, len(state.streams))
    try:
        if target.task_id is not None and await state.store.owner(target.task_id) != principal.id:
            raise NotFound("no prediction with this id was submitted by this client")
        body = await _read_body(request, state.config.max_body_bytes)
        exchange.bytes_in = len(body)
        url = URL(state.upstream_base + target.path + _query(target.query), encoded=True)
        upstream_headers = headers.upstream_request_headers(
            request.headers,
            auth_header="Authorization",
            auth_value=state.auth_value,
            request_id=exchange.request_id,
        )
        owner = principal.id if target.route == "submit" else None
        return await _stream(request, state, exchange, url, upstream_headers, body, owner)
    finally:
        if lease is not None:
            state.store.release(principal.id, lease)


async def _stream(
    request: web.Request,
    state: AppState,
    exchange: Exchange,
    url: URL,
    upstream_headers: CIMultiDict[str],
    body: bytes,
    owner: str | None,
) -> web.StreamResponse:
    config = state.config
    meters = state.metrics.stream(exchange.model)
    watchdog = Watchdog(
        started=exchange.started,
        first_byte=config.first_byte_timeout,
        idle=config.idle_timeout,
        max_duration=config.max_stream_seconds,
    )
    state.stream_opened(watchdog)
    exchange.upstream_contacted = True
    meters.active.inc()
    upstream: aiohttp.ClientResponse | None = None
    response: web.StreamResponse | None = None
    sse: SseTap | None = None
    submission: SubmissionTap | None = None
    try:
        if body:
            meters.bytes_in.inc(len(body))
        with map_upstream_errors():
            upstream = await state.client_session.request(
                request.method,
                url,
                data=body or None,
                headers=upstream_headers,
                allow_redirects=False,
            )
        exchange.status = upstream.status
        watchdog.streaming(asyncio.get_running_loop().time())
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=headers.client_response_headers(
                upstream.headers, request_id=exchange.request_id
            ),
        )
        tap: ChunkTap | None = None
        if upstream.content_type == "text/event-stream":
            tap = sse = SseTap(meters.sse_events.inc)
        elif owner is not None and upstream.status == 200:
            tap = submission = SubmissionTap()
        await response.prepare(request)
        await pump(upstream.content, response, exchange, meters, watchdog, tap)
        exchange.outcome = COMPLETED
        if submission and owner and (task_id := submission.task_id()) is not None:
            await state.store.remember(task_id, owner, config.prediction_ttl)
        return response
    except asyncio.CancelledError:
        outcome = watchdog.claim()
        if outcome is None:  # the client left (handler cancellation) or the process is ending
            exchange.outcome = CLIENT_CLOSED
            raise
        exchange.outcome = outcome
        if response is None:
            raise _pre_header_error(outcome) from None
        return _abort(request, response)
    except RelayError as exc:  # opening the upstream failed: nothing was sent yet
        exchange.outcome = TTFB_TIMEOUT if isinstance(exc, UpstreamTimeout) else UPSTREAM_ERROR
        raise
    except Exception as exc:
        if response is None:
            exchange.outcome = UPSTREAM_ERROR
            raise
        if _client_gone(request):
            exchange.outcome = CLIENT_CLOSED
        else:
            exchange.outcome = UPSTREAM_ERROR
            exchange.detail = type(exc).__name__
            if not isinstance(exc, aiohttp.ClientError | OSError):
                logger.exception("stream_failed")  # a bug, not the network: keep the trace
        return _abort(request, response)
    finally:
        watchdog.stop()
        if sse is not None:
            exchange.sse_events, exchange.terminal = sse.events, sse.terminal
            state.metrics.terminals.labels(exchange.model, sse.terminal).inc()
        state.stream_closed(watchdog)
        meters.active.dec()
        if upstream is not None:
            if exchange.outcome == COMPLETED:
                upstream.release()  # the connection goes back to the pool
            else:
                upstream.close()  # the provider sees the disconnect and stops generating


def _pre_header_error(outcome: str) -> RelayError:
    if outcome == SHUTDOWN:
        return ShuttingDown("the relay is shutting down", retry_after=1)
    return UpstreamTimeout("upstream sent no response before the first-byte deadline")


def _abort(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """End a prepared response so the client sees an error, never a clean end."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    return response


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _query(raw: str) -> str:
    return f"?{raw}" if raw else ""


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body over {limit} bytes") from None
