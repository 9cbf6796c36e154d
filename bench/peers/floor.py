"""The floor: the relay's upstream client behind a bare server protocol of our own.

Not a relay anyone should run. It parses requests with llhttp (``httptools``) in an
``asyncio.Protocol``, sends them upstream through :class:`relay.upstream.Upstreams`, writes
the response head itself and frames each body chunk straight into the client's transport,
with backpressure. It has none of the relay's features: no client auth, limits, allowlist,
header filtering, deadlines, SSE tap, metrics or logs. The relay's own server side
(``relay/front.py``) does what this does and those things too, so the difference between
the two is what the features cost: ``python -m bench.floor`` runs it beside the relay and
nginx.

Configured like the relay: ``RELAY_UPSTREAM_URL``, ``RELAY_PORT``, ``WAVESPEED_API_KEY``.
"""

from __future__ import annotations

import asyncio
import os
import resource
from typing import Any

import httptools
import uvloop
from relay.connection import Connection
from relay.upstream import Upstreams
from yarl import URL

HOP_BY_HOP = {"connection", "content-length", "keep-alive", "transfer-encoding"}


class Client(asyncio.Protocol):
    """One client connection; one request at a time on it."""

    def __init__(self, upstreams: Upstreams, base: str, key: str) -> None:
        self._upstreams = upstreams
        self._origin = URL(base, encoded=True)
        self._base_path = self._origin.raw_path.rstrip("/")
        self._key = key
        self._transport: Any = None
        self._parser = httptools.HttpRequestParser(self)
        self._path = b""
        self._body = b""
        self._task: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._path += url

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode()
        self._task = asyncio.ensure_future(self._relay(method, self._path, self._body))
        self._path = self._body = b""

    async def _relay(self, method: str, path: bytes, body: bytes) -> None:
        headers = [("Authorization", f"Bearer {self._key}"), ("Content-Type", "application/json")]
        sent = await self._upstreams.send(
            method, self._origin, self._base_path + path.decode(), headers, body, len(body)
        )
        upstream = await sent.response()
        transport = self._transport
        head = [b"HTTP/1.1 %d %b\r\n" % (upstream.status, upstream.reason.encode())]
        head += [
            f"{name}: {value}\r\n".encode()
            for name, value in upstream.fields
            if name.lower() not in HOP_BY_HOP
        ]
        transport.write(b"".join([*head, b"Transfer-Encoding: chunked\r\n\r\n"]))
        try:
            await self._pump(upstream, transport)
        except BaseException:
            upstream.close()
            transport.abort()  # never a clean end for a cut stream
            raise
        transport.write(b"0\r\n\r\n")
        upstream.release()
        self._task = None

    async def _pump(self, upstream: Connection, transport: Any) -> None:
        def forward(chunk: bytes) -> None:
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if self._paused:
                upstream.pause()

        upstream.attach(forward)
        while not await upstream.wait():
            if self._paused:
                self._drained = asyncio.get_running_loop().create_future()
                await self._drained
            upstream.resume()


async def serve() -> None:
    upstreams = Upstreams(connect_timeout=5.0)
    base = os.environ["RELAY_UPSTREAM_URL"].rstrip("/")
    key = os.environ.get("WAVESPEED_API_KEY", "")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(upstreams, base, key),
        "127.0.0.1",
        int(os.environ["RELAY_PORT"]),
        backlog=4096,
    )
    await server.serve_forever()


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve())
