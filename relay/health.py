"""``/healthz`` (the process runs), ``/readyz`` (it takes new streams), ``/metrics``."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Draining(Protocol):
    """Anything that knows whether the relay is draining (an app's state, the supervisor)."""

    @property
    def draining(self) -> bool: ...


def add_routes(router: web.UrlDispatcher, state: Draining) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if state.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ready"})

    router.add_get("/healthz", healthz, allow_head=True)
    router.add_get("/readyz", readyz, allow_head=True)


def add_metrics_route(router: web.UrlDispatcher, registry: CollectorRegistry) -> None:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    router.add_get("/metrics", metrics)


def create_admin_app(state: Draining, registry: CollectorRegistry) -> web.Application:
    """The admin listener: metrics and health, nothing relayed."""
    app = web.Application()
    add_routes(app.router, state)
    add_metrics_route(app.router, registry)
    return app
