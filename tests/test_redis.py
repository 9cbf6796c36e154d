"""Limits shared through a real redis-server: two relay apps enforce one limit."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from relay.app import create_app
from relay.redis_store import RedisStore
from relay.state import STATE
from tests.conftest import (
    STEP,
    FakeUpstream,
    RelayServer,
    make_config,
    read_all,
    require_program,
    step,
)

STREAM = "/api/v3/wavespeed-ai/any-llm/stream"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A private redis-server on a free loopback port, gone after the test."""
    server = require_program("redis-server")
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        while b"Ready to accept connections" not in await step(proc.stdout.readline()):
            pass
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        await proc.wait()


@contextlib.asynccontextmanager
async def replica(upstream_url: str, redis_url: str, **overrides) -> AsyncIterator[TestClient]:
    config = make_config(upstream_url, redis_url=redis_url, **overrides)
    app = create_app(config, registry=CollectorRegistry())
    async with TestClient(RelayServer(app, host="127.0.0.1")) as client:
        yield client


async def test_two_replicas_share_one_rate_limit(upstream: FakeUpstream, redis_url: str) -> None:
    """With 3/minute, requests spread over two replicas stop at 3 in total."""
    upstream.respond(200, b"{}")
    async with (
        replica(upstream.url, redis_url, rate_limit=(3, 60.0)) as a,
        replica(upstream.url, redis_url, rate_limit=(3, 60.0)) as b,
    ):
        statuses = [(await client.post(STREAM, data=b"{}")).status for client in (a, b, a, b)]
    assert statuses == [200, 200, 200, 429]
    assert len(upstream.seen) == 3


async def test_two_replicas_share_one_stream_limit(upstream: FakeUpstream, redis_url: str) -> None:
    """One concurrent stream per client holds across replicas, and frees when it ends."""
    feed = upstream.stream()
    async with (
        replica(upstream.url, redis_url, max_streams_per_client=1) as a,
        replica(upstream.url, redis_url, max_streams_per_client=1) as b,
    ):
        first = await step(a.post(STREAM, data=b"{}"))
        assert first.status == 200
        assert (await b.post(STREAM, data=b"{}")).status == 429
        feed.end()
        await read_all(first)
        assert await a.app[STATE].wait_streams_closed(STEP)
        # The release is scheduled, not awaited in the handler: wait for Redis to show it.
        store = a.app[STATE].store
        assert isinstance(store, RedisStore)
        await step(asyncio.gather(*store._tasks))
        upstream.respond(200, b"{}")
        assert (await b.post(STREAM, data=b"{}")).status == 200


async def test_ownership_is_shared_between_replicas(upstream: FakeUpstream, redis_url: str) -> None:
    """A task submitted through one replica can be polled through another by its owner only."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"code": 200, "data": {"id": "task-r1", "status": "created"}})

    upstream.handler = handler
    async with replica(upstream.url, redis_url) as a, replica(upstream.url, redis_url) as b:
        await read_all(await a.post("/api/v3/acme/model", data=b"{}"))
        assert (await b.get("/api/v3/predictions/task-r1")).status == 200
        other = await b.get("/api/v3/predictions/task-r1", headers={"X-Forwarded-For": "x"})
        assert other.status == 200  # same address: XFF is not believed without trusted proxies
    async with replica(upstream.url, redis_url, trusted_proxies=_loopback()) as c:
        stranger = await c.get(
            "/api/v3/predictions/task-r1", headers={"X-Forwarded-For": "192.0.2.7"}
        )
        assert stranger.status == 404


def _loopback():
    import ipaddress

    return (ipaddress.ip_network("127.0.0.0/8"),)


async def test_a_dead_replicas_slot_expires(redis_url: str) -> None:
    """Slots are leases: one never released (its replica died) frees itself on expiry."""
    dead, alive = RedisStore(redis_url, lease_seconds=0.3), RedisStore(redis_url)
    await alive.start()
    try:
        assert await dead.acquire("ip:1", 1) is not None  # never released, never renewed
        assert await alive.acquire("ip:1", 1) is None

        # Expiry is the behaviour under test: retry until the lease has lapsed, within STEP.
        async def until_free() -> str:
            while (lease := await alive.acquire("ip:1", 1)) is None:  # noqa: ASYNC110 - polls Redis, no event exists
                await asyncio.sleep(0.05)
            return lease

        assert await step(until_free())
    finally:
        await dead.close()
        await alive.close()


async def test_held_leases_are_renewed(redis_url: str) -> None:
    """A live replica keeps renewing its slot, so a long stream never loses it."""
    holder, other = RedisStore(redis_url, lease_seconds=0.3), RedisStore(redis_url)
    await holder.start()
    try:
        assert await holder.acquire("ip:2", 1) is not None
        # Let several lease lifetimes pass (nothing should happen): the slot stays taken.
        await asyncio.sleep(1.0)
        assert await other.acquire("ip:2", 1) is None
    finally:
        await holder.close()
        await other.close()
