"""``create_app``: the relay as an aiohttp application. Importing this module does nothing.

The request path, in order (one middleware, visible here):

1. ``bookkeeping``: gives the request its id and :class:`Exchange`, renders relay errors as
   the envelope (only ever before a response is prepared), and in one ``finally`` records
   the request's metrics and its ``request_finished`` log line, whatever way it ended.
2. the handler: ``/healthz`` and ``/readyz``, else :func:`relay.proxy.relay` for every other
   path, which decides from the raw path what is relayed (404/405/400 included).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay import cors, headers, health, proxy
from relay.config import Config
from relay.errors import MethodNotAllowed, NotFound, PayloadTooLarge, RelayError
from relay.exchange import REJECTED, Exchange
from relay.gate import Gate
from relay.limits import MemoryStore, Store
from relay.metrics import RelayMetrics
from relay.redis_store import RedisStore
from relay.routes import Route, Router
from relay.state import EXCHANGE, STATE, AppState
from relay.upstream import Upstreams

logger = structlog.get_logger("relay")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RELAYED = "relayed"  # the catch-all route: every request on it is bookkept
CLIENT_LEFT = 499  # the status recorded when the client left before any response (nginx's)


def create_app(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    pages: Iterable[web.AbstractRouteDef] = (),
    store: Store | None = None,
) -> web.Application:
    """Build the public relay app. ``registry`` defaults to a fresh one per app.

    ``store`` holds the per-client limits: Redis when ``RELAY_REDIS_URL`` is set, else this
    process's memory (tests pass one with a controlled clock).

    ``pages`` are extra routes served before the relay's catch-all (the demo page); like
    the health routes they are neither logged nor counted as relayed requests.
    """
    if store is None:
        store = RedisStore(config.redis_url) if config.redis_url else MemoryStore()
    state = AppState(
        config=config,
        metrics=RelayMetrics(registry),
        store=store,
        gate=Gate(config, store),
        router=Router(wavespeed_route(config), config.routes),
    )
    app = web.Application(
        middlewares=[_bookkeeping(state)],
        # The largest any route accepts; each route's own limit is enforced as it reads.
        client_max_size=max([config.max_body_bytes, *(r.max_upload_bytes for r in config.routes)]),
        handler_args={"max_field_size": 16384},
    )
    app[STATE] = state
    app.cleanup_ctx.append(_upstream_pool)
    app.cleanup_ctx.append(_limit_store)
    app.on_response_prepare.append(cors.response_headers(config.allowed_origins))
    health.add_routes(app.router, state)
    if config.admin_shares_public_listener:
        health.add_metrics_route(app.router, state.metrics.registry)
    app.router.add_routes(pages)
    app.router.add_route("*", "/{tail:.*}", proxy.relay, name=RELAYED)
    return app


def wavespeed_route(config: Config) -> Route:
    """The SPEC's WaveSpeed route, configured by its environment variables."""
    return Route(
        name="wavespeed",
        prefix="/api/v3",
        upstream=config.upstream_url,
        key=config.api_key,
        model_from="path",
        allowed_models=config.allowed_models,
        methods=("GET", "POST"),
    )


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.upstreams = Upstreams(connect_timeout=state.config.connect_timeout)
    yield
    await state.upstreams.close()


async def _limit_store(app: web.Application) -> AsyncIterator[None]:
    store = app[STATE].store
    if isinstance(store, RedisStore):
        await store.start()
    yield
    await store.close()


def _bookkeeping(state: AppState) -> Any:
    metrics = state.metrics

    @web.middleware
    async def bookkeeping(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.route.name != RELAYED:  # health, metrics, pages
            return await handler(request)
        request_id = headers.request_id_from(request.headers.getall("X-Request-ID", ()))
        started = time.monotonic()  # the one clock every stream figure is taken on
        exchange = Exchange(request_id=request_id, client=request.remote or "-", started=started)
        request[EXCHANGE] = exchange
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                response = await handler(request)
                if exchange.status == 0:  # answered without an upstream (a preflight)
                    exchange.status = response.status
                return response
            except RelayError as exc:
                return _render(exchange, exc)
            except web.HTTPException as exc:  # aiohttp's own refusals, in our envelope
                return _render(exchange, _translate(exc))
            finally:
                duration = time.monotonic() - exchange.started
                if exchange.status == 0:
                    exchange.status = CLIENT_LEFT
                metrics.finish(exchange, duration)
                _log_finished(exchange, duration)

    return bookkeeping


def _render(exchange: Exchange, exc: RelayError) -> web.Response:
    exchange.status = exc.status
    exchange.error = exc.code
    if not exchange.upstream_contacted:
        exchange.outcome = REJECTED
    response = web.Response(
        status=exc.status,
        body=exc.envelope(),
        content_type="application/json",
        headers=exc.headers(),
    )
    response.headers["X-Request-ID"] = exchange.request_id
    return response


def _translate(exc: web.HTTPException) -> RelayError:
    if exc.status == 413:
        return PayloadTooLarge("request body too large")
    if exc.status == 405:
        return MethodNotAllowed("method not allowed", allow=())
    return NotFound("no relayed route at this path")


def _log_finished(exchange: Exchange, duration: float) -> None:
    """The canonical record: every SPEC field always; the others only where they apply."""
    ttfb = exchange.first_byte_at
    optional = {
        "error": exchange.error or exchange.detail,
        "events": exchange.sse_events,
        "terminal": exchange.terminal,
        "drained_bytes": exchange.drained_bytes,
        "heartbeats": exchange.heartbeats or None,
    }
    logger.info(
        "request_finished",
        route=exchange.route,
        model=exchange.requested_model or exchange.model,
        status=exchange.status,
        outcome=exchange.outcome,
        bytes_in=exchange.bytes_in,
        bytes_out=exchange.bytes_out,
        chunks=exchange.chunks,
        ttfb_ms=None if ttfb is None else round((ttfb - exchange.started) * 1000, 3),
        duration_ms=round(duration * 1000, 3),
        client=exchange.client,
        **{name: value for name, value in optional.items() if value is not None},
    )
