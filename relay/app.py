"""``create_app``: the relay as an aiohttp application, and :func:`handle`, the one entry of
every relayed request. Importing this module does nothing.

The app serves the relay's health checks, its pages (the demo) and, on a shared listener,
``/metrics``. Every other request is served by :mod:`relay.front`, the relay's own server
side, which calls :func:`handle`: it gives the request its id and :class:`Exchange`, runs
:func:`relay.proxy.relay` (which decides from the raw path what is relayed: 404, 405 and
400 included), renders relay errors as the envelope (only ever before a response began),
and in one ``finally`` records the request's metrics and its ``request_finished`` log line,
whatever way it ended. Serve the app with :func:`relay.server.make_runner`, which puts the
front on its listener; aiohttp alone serves only the app's own routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay import cors, headers, health, proxy
from relay.config import Config
from relay.errors import RelayError
from relay.exchange import REJECTED, Exchange
from relay.front import Request
from relay.gate import Gate
from relay.limits import MemoryStore, Store
from relay.metrics import RelayMetrics
from relay.redis_store import RedisStore
from relay.routes import Route, Router
from relay.state import STATE, AppState
from relay.upstream import Upstreams

logger = structlog.get_logger("relay")

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

    ``pages`` are extra routes aiohttp serves (the demo page); like the health routes they
    are neither logged nor counted as relayed requests.
    """
    if store is None:
        store = RedisStore(config.redis_url) if config.redis_url else MemoryStore()
    state = AppState(
        config=config,
        metrics=RelayMetrics(registry),
        store=store,
        gate=Gate(config, store),
        router=Router(wavespeed_route(config), config.routes),
        upstreams=Upstreams(connect_timeout=config.connect_timeout),
    )
    app = web.Application(handler_args={"max_field_size": 16384})  # as the front allows
    app[STATE] = state
    app.cleanup_ctx.append(_close_upstreams)
    app.cleanup_ctx.append(_limit_store)
    app.on_response_prepare.append(cors.response_headers(config.allowed_origins))
    health.add_routes(app.router, state)
    if config.admin_shares_public_listener:
        health.add_metrics_route(app.router, state.metrics.registry)
    app.router.add_routes(pages)
    return app


def serves(app: web.Application) -> Callable[[str, str], bool]:
    """Whether the app's own routes serve a request, from its method and raw path."""
    exact: dict[str, set[str]] = {}
    prefixes: list[tuple[str, str]] = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        if "path" in info:
            exact.setdefault(info["path"], set()).add(route.method)
        elif "prefix" in info:
            prefixes.append((info["prefix"].rstrip("/") + "/", route.method))
        else:  # a pattern the front cannot match as aiohttp would
            raise ValueError(f"the relay's front cannot serve beside the route {route!r}")

    starts = tuple(prefix for prefix, _ in prefixes)

    def owns(method: str, path: str) -> bool:
        methods = exact.get(path)
        if methods is not None:
            return method in methods
        if not path.startswith(starts):  # every relayed request
            return False
        return any(path.startswith(prefix) and method == m for prefix, m in prefixes)

    return owns


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


async def _close_upstreams(app: web.Application) -> AsyncIterator[None]:
    yield
    app[STATE].deadlines.stop()
    await app[STATE].upstreams.close()


async def _limit_store(app: web.Application) -> AsyncIterator[None]:
    store = app[STATE].store
    if isinstance(store, RedisStore):
        await store.start()
    yield
    await store.close()


async def handle(state: AppState, request: Request) -> None:
    """Serve one request the front took: see the module's docstring."""
    request_id = headers.request_id_from(request.headers.getall("X-Request-ID", ()))
    started = time.monotonic()  # the one clock every stream figure is taken on
    exchange = Exchange(request_id=request_id, client=request.remote or "-", started=started)
    # The request's task has a context of its own: what is bound here ends with it.
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        await proxy.relay(state, request, exchange)
    except RelayError as exc:
        _render(request, exchange, exc)
    except asyncio.CancelledError:
        # The client left, or shutdown cut the request: the outcome is recorded below.
        # The task ends normally, so the exception's traceback and the frames it holds
        # are freed by reference counting, never left in a cycle for the collector.
        pass
    except Exception as exc:  # a bug: answer (or cut) as aiohttp would, keep the trace
        logger.exception("request_failed")
        exchange.detail = type(exc).__name__
        if request.started:
            request.abort()
        else:
            _render(request, exchange, RelayError("internal error"))
    finally:
        duration = time.monotonic() - exchange.started
        if exchange.status == 0:
            exchange.status = CLIENT_LEFT
        state.metrics.finish(exchange, duration)
        _log_finished(exchange, duration)


def _render(request: Request, exchange: Exchange, exc: RelayError) -> None:
    exchange.status = exc.status
    exchange.error = exc.code
    if not exchange.upstream_contacted:
        exchange.outcome = REJECTED
    reply = [("Content-Type", "application/json"), *exc.headers().items()]
    reply.append(("X-Request-ID", exchange.request_id))
    request.reply(exc.status, exc.envelope(), reply)


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
