"""Running the relay: listeners, signals and the graceful drain. No request logic here.

On SIGTERM (or SIGINT) the public listener stops accepting, ``/readyz`` answers 503, new
requests on kept-alive connections get 503 ``shutting_down``, open streams may finish for
``RELAY_SHUTDOWN_GRACE`` seconds, then what is left is cut (outcome ``shutdown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, cast

import structlog
from aiohttp import web

from relay import cors, speedups
from relay.app import create_app, handle, serves
from relay.config import Config
from relay.exchange import SHUTDOWN
from relay.front import FrontServer
from relay.health import create_admin_app
from relay.mock_upstream import create_mock_app
from relay.state import STATE

logger = structlog.get_logger("relay.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

BACKLOG = 2048
GC_THRESHOLDS = (20_000, 20, 20)
# After the grace ran out and the streams were cut, how long their handlers may take to end.
CUT_SETTLE_SECONDS = 5.0


class CannotListen(Exception):
    """A listener could not take its address: in use, not this host's, or not permitted."""


def _cannot_listen(exc: OSError, address: str, setting: str) -> CannotListen:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return CannotListen(f"cannot listen on {address}: {reason} (set {setting})")


async def listen(site: web.BaseSite, address: str, setting: str) -> None:
    """Start ``site``; if its address cannot be bound, raise :class:`CannotListen` with the
    OS's reason and the ``setting`` that chooses another (a message, not a traceback)."""
    try:
        await site.start()
    except OSError as exc:
        raise _cannot_listen(exc, address, setting) from exc


def bind(host: str, port: int) -> socket.socket:
    """The public listening socket that ``relay serve --workers N`` shares with its workers."""
    try:
        return socket.create_server((host, port), backlog=BACKLOG)
    except OSError as exc:
        raise _cannot_listen(exc, f"{host}:{port}", "RELAY_PORT") from exc


@contextlib.contextmanager
def stopped_by_signals(stop: asyncio.Event) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT set ``stop`` (and no longer end the process)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class RelayRunner(web.AppRunner):
    """An ``AppRunner`` whose listeners start each connection on the relay's front
    (:mod:`relay.front`), which hands aiohttp the requests for the app's own routes."""

    async def _make_server(self) -> web.Server:
        self.app.middlewares.append(_close_after)
        aiohttp_server = await super()._make_server()
        state = self.app[STATE]
        front = FrontServer(
            aiohttp_server,
            handle=functools.partial(handle, state),
            handoff=serves(self.app),
            label=functools.partial(cors.labels, allowed=state.config.allowed_origins),
        )
        return cast(web.Server, front)  # aiohttp uses its protocol factory and shutdown only


@web.middleware
async def _close_after(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A connection handed to aiohttp serves one request: the next goes to a new
    connection, and so to the front (a browser that fetched the demo page relays next)."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.force_close()
        raise
    response.force_close()
    return response


def make_runner(app: web.Application) -> web.AppRunner:
    """A runner for ``create_app``'s app: the front for relayed requests, aiohttp for the
    app's own routes; handlers are cancelled when their client disconnects."""
    return RelayRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=CUT_SETTLE_SECONDS
    )


async def serve(
    config: Config,
    *,
    app: web.Application | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str, str], None] | None = None,
    sock: socket.socket | None = None,
    admin: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain and return.

    A worker of ``relay serve --workers N`` gets the shared listening ``sock`` and no admin
    listener (the supervisor serves ``/metrics`` for all workers).
    """
    app = app if app is not None else create_app(config)
    stop = stop if stop is not None else asyncio.Event()
    with stopped_by_signals(stop):
        await _serve(config, app, stop, on_ready, sock, admin)


async def _serve(
    config: Config,
    app: web.Application,
    stop: asyncio.Event,
    on_ready: Callable[[str, str], None] | None,
    sock: socket.socket | None,
    admin: bool,
) -> None:
    state = app[STATE]
    runner = make_runner(app)
    await runner.setup()
    admin_runner: web.AppRunner | None = None
    started = False
    try:
        site: web.BaseSite = (
            web.SockSite(runner, sock)
            if sock is not None
            else web.TCPSite(runner, config.host, config.port, backlog=BACKLOG)
        )
        await listen(site, f"{config.host}:{config.port}", "RELAY_PORT")
        public_url = admin_url = url_of(runner)
        if admin and not config.admin_shares_public_listener:
            admin_runner = web.AppRunner(
                create_admin_app(state, state.metrics.registry), access_log=None
            )
            await admin_runner.setup()
            admin_site = web.TCPSite(admin_runner, config.admin_host, config.admin_port)
            await listen(admin_site, f"{config.admin_host}:{config.admin_port}", "RELAY_ADMIN_PORT")
            admin_url = url_of(admin_runner)

        _tune_gc()
        logger.info(
            "relay_started" if admin else "worker_ready",
            url=public_url,
            admin_url=admin_url,
            upstream=config.upstream_url,
            allowed_models=list(config.allowed_models),
            speedups=speedups.COMPILED,
        )
        started = True
        if on_ready is not None:
            on_ready(public_url, admin_url)
        await stop.wait()
        state.draining = True
        logger.info("draining", open_streams=len(state.streams), grace_s=config.shutdown_grace)
        await site.stop()
        if not await state.wait_streams_closed(config.shutdown_grace):
            logger.warning("drain_grace_over", cut_streams=state.cut_streams(SHUTDOWN))
    finally:
        await runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
        if started:
            logger.info("relay_stopped")


async def serve_mock(host: str, port: int, key: str) -> None:
    """``relay mock-upstream``: only the built-in mock upstream, until SIGTERM or SIGINT."""
    runner = web.AppRunner(create_mock_app(key))
    await runner.setup()
    try:
        await listen(web.TCPSite(runner, host, port), f"{host}:{port}", "--port")
        logger.info("mock_upstream_started", url=url_of(runner))
        stop = asyncio.Event()
        with stopped_by_signals(stop):
            await stop.wait()
    finally:
        await runner.cleanup()


def _tune_gc() -> None:
    """Collect less often, and never rescan what start-up built.

    The per-chunk path allocates objects that die young (futures, buffers), so with the
    default first-generation threshold of 700 the collector runs hundreds of times a second
    under load, and each older-generation pass walks every long-lived object (the app,
    imported modules, every open stream). Freezing start-up objects and raising the
    threshold cut that work and the tail latency it adds; cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def url_of(runner: web.AppRunner) -> str:
    """The listener's real address (the port the OS chose when 0 was asked for)."""
    host, port = runner.addresses[0][:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine function on uvloop where it is available, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows, or a minimal install
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
