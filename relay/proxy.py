"""The relay handler: validate -> admit -> read the model -> open the upstream -> prepare ->
pump -> classify.

Everything that can be refused is refused before the upstream is contacted. Relay errors
are raised (and rendered as the envelope by the app's middleware) only while nothing has
been sent; once the response is prepared, any failure aborts the client connection so a
cut stream never looks complete. The outcome is classified in exactly one ``finally``.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from typing import IO

import structlog
from aiohttp.helpers import parse_mimetype
from yarl import URL

from relay import cors, headers, policy
from relay.access import Principal
from relay.connection import Connection
from relay.errors import (
    BadRequest,
    ModelNotAllowed,
    PayloadTooLarge,
    RelayError,
    ShuttingDown,
    UpstreamTimeout,
)
from relay.exchange import (
    CLIENT_CLOSED,
    COMPLETED,
    DRAINED,
    SHUTDOWN,
    TTFB_TIMEOUT,
    UPSTREAM_ERROR,
    Exchange,
)
from relay.forms import form_field
from relay.front import Request
from relay.metrics import StreamMeters
from relay.ownership import SubmissionTap
from relay.policy import Target
from relay.pump import ChunkTap, Forwarder, Heartbeat, Watchdog, drain, pump
from relay.routes import Route, is_valid_body_model
from relay.sse import SseTap
from relay.state import AppState

logger = structlog.get_logger("relay.proxy")

Body = bytes | IO[bytes]
SPOOL_IN_MEMORY = 1024 * 1024  # an upload larger than this waits on disk, not in memory


async def relay(state: AppState, request: Request, exchange: Exchange) -> None:
    """Relay one request to the upstream its route names."""
    if request.method == "OPTIONS":
        exchange.route = "preflight"
        request.reply(204, b"", cors.preflight(request, state.config.allowed_origins))
        exchange.status = 204
        return
    principal = state.gate.identify(request)
    exchange.client = principal.id
    route, target = state.router.resolve(request.method, request.raw_path)
    exchange.route = target.route
    if state.draining:
        raise ShuttingDown("the relay is shutting down", retry_after=1)

    lease = await state.gate.admit(principal, target, len(state.streams))
    spool: IO[bytes] | None = None
    try:
        body, size, model = await _read_body(request, route, target, state.config.max_body_bytes)
        spool = None if isinstance(body, bytes) else body
        if model != policy.POLLING_MODEL:
            exchange.requested_model = model
            allowlist = state.router.allowlists[route.name]
            if not (allowlist.allows(model) and principal.may_use(model)):
                raise ModelNotAllowed(f"model {model!r} is not allowed by this relay")
            exchange.model = allowlist.label(model)
        if target.task_id is not None:
            await state.gate.check_owner(principal, target.task_id)
        exchange.bytes_in = size
        endpoint = state.router.endpoints[route.name]
        outgoing = Outgoing(
            endpoint.origin,
            endpoint.base_path + target.path + _query(target.query),
            headers.upstream_request_headers(
                request.fields,
                auth_header=endpoint.auth[0],
                auth_value=endpoint.auth[1],
                request_id=exchange.request_id,
            ),
            body,
            size,
        )
        del body  # the outgoing request holds it, and only until it is sent
        owner = principal if target.route == "submit" else None
        await _stream(request, state, route, exchange, outgoing, owner)
    finally:
        if lease is not None:
            state.store.release(principal.id, lease)
        if spool is not None:
            spool.close()


@dataclass(slots=True)
class Outgoing:
    """The request for the upstream, kept only until it is sent: a stream can outlive its
    request body (up to ``RELAY_MAX_BODY_BYTES``, or a spooled upload) by hours."""

    origin: URL
    target: str  # the path and query, as sent
    headers: list[tuple[str, str]]
    body: Body
    size: int

    def sent(self) -> None:
        if not isinstance(self.body, bytes):
            self.body.close()
        self.body = b""
        self.headers = []


async def _read_body(
    request: Request, route: Route, target: Target, limit: int
) -> tuple[Body, int, str]:
    """The body to forward (its original bytes), its size, and the model it names.

    ``json`` and ``form`` routes read the model from the body the request actually carries:
    a multipart upload's ``model`` field, or a JSON body's ``model`` key.
    """
    from_body = route.model_from in ("json", "form")
    if from_body and request.content_type == "multipart/form-data":
        spool, size = await _spool(request, route.max_upload_bytes)
        boundary = parse_mimetype(request.headers["Content-Type"]).parameters.get("boundary")
        if not boundary:
            spool.close()
            raise BadRequest("a multipart/form-data upload without a boundary")
        model = form_field(spool, boundary, "model")
        spool.seek(0)
        return spool, size, _checked_model(model, spool)
    body = await _read_bounded(request, limit)
    if from_body:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not JSON") from None
        model = payload.get("model") if isinstance(payload, dict) else None
        return body, len(body), _checked_model(model, None)
    if route.model_from == "path" and target.model != policy.POLLING_MODEL:
        return body, len(body), target.model
    return body, len(body), policy.POLLING_MODEL


def _checked_model(model: object, spool: IO[bytes] | None) -> str:
    if isinstance(model, str) and is_valid_body_model(model):
        return model
    if spool is not None:
        spool.close()
    raise BadRequest('the request names no valid "model"')


async def _read_bounded(request: Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    body = request.arrived_body()  # usually: a small body comes with its head
    if body is None:
        buffer = bytearray()
        async for chunk in request.body():
            buffer += chunk
            if len(buffer) > limit:
                raise PayloadTooLarge(f"request body over {limit} bytes")
        body = bytes(buffer)
    if len(body) > limit:  # a chunked body says its size only as it arrives
        raise PayloadTooLarge(f"request body over {limit} bytes")
    return body


async def _spool(request: Request, limit: int) -> tuple[IO[bytes], int]:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"upload over {limit} bytes")
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - closed by the caller
    size = 0
    try:
        async for chunk in request.body():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"upload over {limit} bytes")
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, size


async def _stream(
    request: Request,
    state: AppState,
    route: Route,
    exchange: Exchange,
    outgoing: Outgoing,
    owner: Principal | None,
) -> None:
    config = state.config
    watchdog = Watchdog(
        started=exchange.started,
        first_byte=config.first_byte_timeout,
        idle=config.idle_timeout,
        max_duration=config.max_stream_seconds,
    )
    state.stream_opened(watchdog)
    exchange.upstream_contacted = True
    meters: StreamMeters | None = None
    upstream: Connection | None = None
    opening: _Opening | None = None
    try:
        sent = await state.upstreams.send(
            request.method,
            outgoing.origin,
            outgoing.target,
            outgoing.headers,
            outgoing.body,
            outgoing.size,
        )
        upstream = sent.connection
        # The request is on its way. Whatever does not need the response is done now, while
        # the upstream works on it, rather than between its first byte and the client's.
        meters = state.metrics.stream(exchange.model, exchange)
        meters.active.inc()
        if exchange.bytes_in:
            meters.bytes_in.inc(exchange.bytes_in)
        opening = _Opening(request, route, exchange, outgoing, meters, watchdog, owner)
        sent.when_answered(opening)
        upstream = await sent.response()  # a stale pooled connection is replaced here
        opening(upstream)  # a no-op once the head's arrival did it
        forward = opening.forward
        if forward is None:
            error, opening.error = opening.error, None
            assert error is not None
            raise error
        await pump(upstream, forward, request)
        exchange.outcome = COMPLETED
        submission = opening.submission
        if submission and owner and (task_id := submission.task_id()) is not None:
            # Before the response ends: a client may poll the moment it has the task id.
            await state.gate.record_owner(owner, task_id, config.prediction_ttl)
        request.finish()
    except asyncio.CancelledError:
        outcome = watchdog.claim()
        if outcome is None:  # the client left (handler cancellation) or the process is ending
            exchange.outcome = CLIENT_CLOSED
            if upstream is None or not request.started or route.on_disconnect != "drain":
                raise
            if not _uncancel():
                raise
            await _drain(upstream, exchange, watchdog, route, absorbed=True)
            request.abort()
            return
        exchange.outcome = outcome
        if not request.started:
            raise _pre_header_error(outcome) from None
        request.abort()
    except RelayError as exc:  # opening the upstream failed: nothing was sent yet
        exchange.outcome = TTFB_TIMEOUT if isinstance(exc, UpstreamTimeout) else UPSTREAM_ERROR
        raise
    except Exception as exc:
        if not request.started:
            exchange.outcome = UPSTREAM_ERROR
            raise
        if request.client_gone:
            exchange.outcome = CLIENT_CLOSED
            if upstream is not None and route.on_disconnect == "drain":
                await _drain(upstream, exchange, watchdog, route)
        else:
            exchange.outcome = UPSTREAM_ERROR
            exchange.detail = type(exc).__name__
            if not isinstance(exc, OSError):
                logger.exception("stream_failed")  # a bug, not the network: keep the trace
        request.abort()
    finally:
        watchdog.stop()
        if opening is not None and opening.heartbeat is not None:
            opening.heartbeat.stop()
        if meters is not None:
            meters.close()
            meters.active.dec()
        if opening is not None and (sse := opening.sse) is not None:
            exchange.sse_events, exchange.terminal = sse.events, sse.terminal
            state.metrics.terminal(exchange.model, sse.terminal)
        state.stream_closed(watchdog)
        if upstream is not None:
            if exchange.outcome in (COMPLETED, DRAINED):
                upstream.release()  # the connection goes back to the pool
            else:
                upstream.close()  # the provider sees the disconnect and stops generating


class _Opening:
    """Begins the client's response the moment the upstream's head is parsed.

    The upstream connection calls it from the socket callback that carried the head
    (:meth:`relay.upstream.Sent.when_answered`), before the body bytes of the same read: so
    the first chunk goes to the client in that callback, with the head, rather than a turn
    of the loop later, once the handler's task has woken. The handler calls it again after
    the head (a no-op by then). What it raises is kept for the handler to raise, in the
    handler, where it is classified as it always was; and once the handler's task is being
    cut (a deadline, the client left), it leaves the head to the handler, which is on its
    way out.
    """

    __slots__ = (
        "error", "exchange", "forward", "heartbeat", "meters", "outgoing", "owner", "request",
        "route", "sse", "submission", "watchdog",
    )  # fmt: skip

    def __init__(
        self,
        request: Request,
        route: Route,
        exchange: Exchange,
        outgoing: Outgoing,
        meters: StreamMeters,
        watchdog: Watchdog,
        owner: Principal | None,
    ) -> None:
        self.request, self.route, self.exchange = request, route, exchange
        self.outgoing, self.meters, self.watchdog, self.owner = outgoing, meters, watchdog, owner
        self.forward: Forwarder | None = None
        self.error: Exception | None = None
        self.sse: SseTap | None = None
        self.submission: SubmissionTap | None = None
        self.heartbeat: Heartbeat | None = None

    def __call__(self, upstream: Connection) -> None:
        if self.forward is not None or self.error is not None or self.watchdog.cutting:
            return
        try:
            self._open(upstream)
        except Exception as exc:
            self.error = exc

    def _open(self, upstream: Connection) -> None:
        request, exchange, meters = self.request, self.exchange, self.meters
        watchdog = self.watchdog
        self.outgoing.sent()
        exchange.status = upstream.status
        watchdog.streaming(time.monotonic())
        tap: ChunkTap | None = None  # called per chunk by the forwarder
        if upstream.content_type == "text/event-stream":
            meters.events = self.sse = tap = SseTap()  # the forwarder knows its fast path
        elif self.owner is not None and upstream.status == 200:
            self.submission = submission = SubmissionTap()
            tap = submission.__call__  # a bound method: the fastest call to a Python object
        request.start(
            upstream.status,
            upstream.reason,
            headers.client_response_headers(upstream.fields, request_id=exchange.request_id),
        )
        forward = Forwarder(request, upstream, exchange, meters, watchdog, tap)
        if self.sse is not None and (every := self.route.sse_heartbeat) is not None:
            self.heartbeat = Heartbeat(every, forward, upstream, self.sse, exchange, watchdog)
        forward.attach(upstream)
        self.forward = forward


def _uncancel() -> bool:
    """Take back the client's cancellation to keep draining; False if more are pending."""
    task = asyncio.current_task()
    return task is not None and task.uncancel() == 0


async def _drain(
    upstream: Connection,
    exchange: Exchange,
    watchdog: Watchdog,
    route: Route,
    *,
    absorbed: bool = False,
) -> None:
    """The client left on a ``drain`` route: read the upstream to its end, bounded.

    The client's leaving cancels this task once (handler cancellation); that cancellation
    is absorbed, unless it already was. Deadlines and the shutdown cut still end the drain.
    """
    while True:
        try:
            if await drain(upstream, exchange, watchdog, route.drain_max_bytes):
                exchange.outcome = DRAINED
            return
        except asyncio.CancelledError:
            outcome = watchdog.claim()
            if outcome is not None:
                exchange.outcome = outcome
                return
            if absorbed or not _uncancel():
                raise
            absorbed = True
        except OSError as exc:
            exchange.outcome = UPSTREAM_ERROR
            exchange.detail = type(exc).__name__
            return


def _pre_header_error(outcome: str) -> RelayError:
    if outcome == SHUTDOWN:
        return ShuttingDown("the relay is shutting down", retry_after=1)
    return UpstreamTimeout("upstream sent no response before the first-byte deadline")


def _query(raw: str) -> str:
    return f"?{raw}" if raw else ""
