"""Shared fixtures: a scriptable fake upstream and the relay, both on real loopback sockets.

The fake upstream emits exactly what a test feeds it, when the test feeds it, so tests can
prove ordering (lockstep) without sleeping. Every wait is bounded by ``STEP``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from relay.app import create_app
from relay.config import Config
from relay.server import RelayRunner

STEP = 5.0  # the longest any single awaited step may take before the test fails
FAKE_KEY = "sk-test-FAKE-0123456789abcdef"
SSE = "text/event-stream"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RelayServer(TestServer):
    """A test server for ``create_app``'s app as ``relay serve`` runs it: behind the front."""

    async def _make_runner(self, **kwargs: Any) -> RelayRunner:
        return RelayRunner(self.app, **kwargs)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on asyncio's loop and on uvloop, the loop ``relay serve`` uses
    where it is available: how bytes move between sockets (flow control, ``writelines``,
    pausing reads) is where their transports differ."""
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    if sys.platform != "win32":  # as pyproject.toml: no uvloop there
        import uvloop

        loops["uvloop"] = uvloop.new_event_loop
    return loops


async def step(awaitable: Awaitable[Any]) -> Any:
    """Await one step of a test, failing (not hanging) if it does not happen."""
    return await asyncio.wait_for(awaitable, STEP)


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path_qs: str
    headers: dict[str, list[str]]
    body: bytes


class Feed:
    """The upstream's side of one streamed response, driven by the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | Callable[[web.Request], None] | None] = asyncio.Queue()

    def send(self, chunk: bytes) -> None:
        self.queue.put_nowait(chunk)

    def end(self) -> None:
        self.queue.put_nowait(None)

    def abort(self) -> None:
        """Drop the connection mid-body: no terminating chunk."""
        self.queue.put_nowait(lambda request: request.transport and request.transport.abort())


@dataclass
class FakeUpstream:
    """An upstream server whose behaviour each test scripts."""

    server: TestServer | None = None
    seen: list[Seen] = field(default_factory=list)
    handler: Handler | None = None
    contacted: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    written: int = 0  # body bytes the upstream handed to its socket

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        self.seen.append(Seen(request.method, request.path_qs, headers, body))
        self.contacted.set()
        assert self.handler is not None, "the test did not script the upstream"
        try:
            return await self.handler(request)
        except (asyncio.CancelledError, ConnectionError):
            self.disconnected.set()
            raise

    def respond(
        self, status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, body=body, headers=headers)

        self.handler = handler

    def stream(self, content_type: str = SSE, headers: dict[str, str] | None = None) -> Feed:
        """Respond with a stream whose chunks the test feeds one by one."""
        feed = Feed()

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": content_type, **(headers or {})})
            await response.prepare(request)
            while (item := await feed.queue.get()) is not None:
                if callable(item):
                    item(request)
                    return response
                await response.write(item)
                self.written += len(item)
            await response.write_eof()
            return response

        self.handler = handler
        return feed

    def hang(self) -> None:
        """Never answer (until the relay gives up and disconnects)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        self.handler = handler


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    app = web.Application(client_max_size=1024**3)  # uploads in tests are bounded by the relay
    app.router.add_route("*", "/{tail:.*}", fake._handle)
    fake.server = TestServer(app, host="127.0.0.1")
    await fake.server.start_server()  # handler_cancellation=True, as for the relay
    yield fake
    await fake.server.close()


def make_config(upstream_url: str, **overrides: Any) -> Config:
    defaults: dict[str, Any] = {
        "api_key": FAKE_KEY,
        "upstream_url": upstream_url,
        "allowed_models": ("minimax/speech-02-hd", "wavespeed-ai/any-llm", "acme/*"),
        "connect_timeout": 2.0,
        "first_byte_timeout": 10.0,
        "idle_timeout": 10.0,
        "max_stream_seconds": 30.0,
    }
    return Config(**{**defaults, **overrides})


@dataclass
class Relay:
    client: TestClient[web.Request, web.Application]
    app: web.Application
    registry: CollectorRegistry

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def make_relay(upstream: FakeUpstream) -> AsyncIterator[RelayFactory]:
    """Build a relay in front of ``upstream``; keyword arguments override its Config."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def factory(**overrides: Any) -> Relay:
        registry = CollectorRegistry()
        store = overrides.pop("store", None)
        config = make_config(overrides.pop("upstream_url", upstream.url), **overrides)
        app = create_app(config, registry=registry, store=store)
        client = TestClient(RelayServer(app, host="127.0.0.1"), auto_decompress=False)
        await client.start_server()
        clients.append(client)
        return Relay(client, app, registry)

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def relay(make_relay: RelayFactory) -> Relay:
    return await make_relay()


async def raw_request(url: str, data: bytes) -> bytes:
    """Send bytes exactly as given and return the response head (for crafted paths)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await step(reader.readuntil(b"\r\n\r\n"))
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def give_up_before_headers(relay: Relay, upstream: FakeUpstream, path: str) -> None:
    """A client that sends a request, then leaves while the upstream has not answered."""
    upstream.hang()
    request = asyncio.ensure_future(relay.client.post(path, data=b"{}"))
    await step(upstream.contacted.wait())
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    await step(upstream.disconnected.wait())


def require_program(name: str) -> str:
    """The path of an external program; skip without it locally, fail without it in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}, and CI must run this test (.ci/run installs it)")
        pytest.skip(message)
    return path


async def read_all(response: aiohttp.ClientResponse) -> bytes:
    return bytes(await step(response.content.read()))


@pytest.fixture(autouse=True)
async def loop_errors_fail_the_test() -> AsyncIterator[None]:
    """A callback that raises inside the event loop (in ``connection_lost``, say) is only
    logged by asyncio; here it fails the test that caused it."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield
    loop.set_exception_handler(None)
    assert not errors, [context.get("message") for context in errors]
