"""The upstream client on the wire: framing, keep-alive, retries, TLS, and refusals.

A scripted raw TCP server stands in for the upstream, so each test decides the exact bytes
of each response and can see every connection the pool opens.
"""

from __future__ import annotations

import asyncio
import io
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO

import pytest
import trustme
from yarl import URL

from relay import connection as connection_module
from relay.connection import (
    MAX_HEAD_BYTES,
    UPLOAD_CHUNK,
    Connection,
    UpstreamClosed,
    UpstreamProtocolError,
)
from relay.errors import UpstreamTimeout, UpstreamUnavailable
from relay.speedups import SwitchPy
from relay.upstream import Upstreams, _request_head
from tests.conftest import step

# Reads one request (head and Content-Length body) and answers it; returns False to close.
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class WireServer:
    """A raw HTTP/1.1 server answering each request on a connection with ``script``."""

    script: Script
    ssl: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.ssl else 'http'}://localhost:{port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = _content_length(head)
                self.requests.append(head + await reader.readexactly(length))
                if not await self.script(reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed.put_nowait(number)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def answer(*parts: bytes, keep: bool = True) -> Script:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        for part in parts:
            writer.write(part)
            await writer.drain()
        return keep

    return script


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.fixture
async def wire() -> AsyncIterator[Callable[..., Awaitable[WireServer]]]:
    servers: list[WireServer] = []

    async def start(script: Script, tls: ssl.SSLContext | None = None) -> WireServer:
        server = WireServer(script, ssl=tls)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.server is not None
        server.server.close()


@pytest.fixture
async def pool() -> AsyncIterator[Upstreams]:
    upstreams = Upstreams(connect_timeout=5)
    yield upstreams
    await upstreams.close()


async def request(
    pool: Upstreams, method: str, url: str, body: bytes | IO[bytes] = b"", size: int = 0
) -> Connection:
    """A request as the relay makes one: sent, then its connection once the head is in."""
    target = URL(url, encoded=True)
    sent = await pool.send(method, target, target.raw_path_qs, [], body, size)
    return await sent.response()


async def fetch(
    pool: Upstreams, url: str, method: str = "POST", body: bytes = b"{}"
) -> tuple[Connection, list[bytes]]:
    """One exchange read to its end: the connection (not yet released) and its chunks."""
    connection = await step(request(pool, method, url, body, len(body)))
    chunks: list[bytes] = []
    connection.attach(chunks.append)
    assert await step(connection.wait())
    return connection, chunks


@pytest.mark.parametrize("switch", ["compiled", "python"])
async def test_chunked_body_arrives_chunk_by_chunk_and_the_connection_is_reused(
    wire: Callable[..., Awaitable[WireServer]],
    pool: Upstreams,
    switch: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each chunk of a chunked body reaches the sink as sent; the next request reuses the
    socket. The same with the Python twin of the body callback's switch (no C compiler)."""
    if switch == "python":
        monkeypatch.setattr(connection_module, "Switch", SwitchPy)
    server = await wire(answer(CHUNKED, b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"))
    for _ in range(3):
        connection, chunks = await fetch(pool, server.url + "/v1/x")
        assert connection.status == 200
        assert connection.content_type == "text/event-stream"
        assert b"".join(chunks) == b"hello world"
        connection.release()
    assert server.connections == 1
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("parts", "keep", "body", "connections"),
    [
        pytest.param(
            (b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\n", b"abcd"),
            True, b"abcd", 1, id="content-length-kept",
        ),
        pytest.param(
            (b"HTTP/1.1 201 Created\r\n\r\n", b"all of it"),
            False, b"all of it", 2, id="delimited-by-close",
        ),
        pytest.param(
            (b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",),
            True, b"ok", 2, id="connection-close-honoured",
        ),
    ],
)  # fmt: skip
async def test_framing_ends_the_body_and_decides_reuse(
    wire: Callable[..., Awaitable[WireServer]],
    pool: Upstreams,
    parts: tuple[bytes, ...],
    keep: bool,
    body: bytes,
    connections: int,
) -> None:
    """The body ends where its framing says; only a socket the response keeps alive is reused
    (a body delimited by the close, or Connection: close, means a new socket next time)."""
    server = await wire(answer(*parts, keep=keep))
    for _ in range(2):
        connection, chunks = await fetch(pool, server.url)
        assert (connection.status, connection.reason, b"".join(chunks)) == (201, "Created", body)
        connection.release()
    assert server.connections == connections


async def test_a_body_cut_mid_chunk_raises_upstream_closed(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """An upstream that closes inside a chunked body fails the exchange: never a clean end."""
    server = await wire(answer(CHUNKED, b"5\r\nhello\r\n", b"8\r\nhal", keep=False))
    connection = await step(request(pool, "POST", server.url))
    chunks: list[bytes] = []
    connection.attach(chunks.append)
    with pytest.raises(UpstreamClosed):
        await step(connection.wait())
    assert b"".join(chunks) == b"hellohal"


@pytest.fixture(params=["compiled", "python"])
def switches(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection's switches as built (C where they were), or their Python twin."""
    if request.param == "python":
        monkeypatch.setattr(connection_module, "Switch", SwitchPy)


def _after_the_first_chunk(second: bytes) -> tuple[Script, asyncio.Event]:
    """A chunked response whose ``second`` part leaves only once the first chunk was taken:
    it arrives on its own, while the body streams straight into llhttp."""
    taken = asyncio.Event()

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(CHUNKED + b"5\r\nhello\r\n")
        await writer.drain()
        await taken.wait()
        writer.write(second)
        await writer.drain()
        return False

    return script, taken


@pytest.mark.usefixtures("switches")
async def test_a_body_that_breaks_its_framing_midway_is_an_invalid_response(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """Once the head is in, what arrives goes straight to llhttp; a chunk it cannot parse
    still fails the exchange as an invalid response, as one in the head's packet does."""
    script, taken = _after_the_first_chunk(b"zz\r\nnot a chunk\r\n")
    connection = await step(request(pool, "POST", (await wire(script)).url))
    chunks: list[bytes] = []
    connection.attach(lambda chunk: (chunks.append(chunk), taken.set()))
    with pytest.raises(UpstreamProtocolError, match="invalid response"):
        await step(connection.wait())
    assert chunks == [b"hello"]
    assert not connection.usable


@pytest.mark.usefixtures("switches")
async def test_bytes_after_a_streamed_body_end_the_connection_quietly(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """A body that ends in the same packet as stray bytes completes, and the connection is
    closed, not reused: the stray bytes fail it as on the head's packet, not the event loop
    (which would report a fatal error on the transport)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        script, taken = _after_the_first_chunk(b"0\r\n\r\nHTTP/1.1 200 OK\r\n")
        server = await wire(script)
        connection = await step(request(pool, "POST", server.url))
        connection.attach(lambda _: taken.set())
        assert await step(connection.wait())
        await step(server.closed.get())  # the stray bytes were sent, and the relay hung up
        assert not connection.usable
        assert reported == []
    finally:
        loop.set_exception_handler(None)


@pytest.mark.usefixtures("switches")
async def test_a_sink_that_raises_midway_fails_the_exchange_with_its_error(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """A sink's own error (a bug) reaches the handler as itself, not as the parser's."""
    script, taken = _after_the_first_chunk(b"5\r\nworld\r\n0\r\n\r\n")
    connection = await step(request(pool, "POST", (await wire(script)).url))

    def sink(chunk: bytes) -> None:
        if taken.is_set():
            raise LookupError(f"the sink broke on {chunk!r}")
        taken.set()

    connection.attach(sink)
    with pytest.raises(LookupError, match="world"):
        await step(connection.wait())
    assert not connection.usable


class _FakeTransport:
    """Enough of a transport for a Connection fed by hand."""

    def __init__(self) -> None:
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class _NoPool:
    def put(self, connection: Connection) -> None:
        pass

    def discard(self, connection: Connection) -> None:
        pass


def _fed(*reads: bytes) -> tuple[Connection, _FakeTransport]:
    connection = Connection(_NoPool(), ("http", "upstream", 80))
    transport = _FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    for data in reads:
        connection.data_received(data)
    return connection, transport


async def test_a_head_that_comes_with_much_of_its_body_in_one_read_is_taken() -> None:
    """A fast upstream's first read can be its head and hundreds of kilobytes of body
    (uvloop reads up to 256 KiB at a time): only the head counts against its limit."""
    body = bytes(range(256)) * 1200  # 300 KiB
    connection, transport = _fed(b"HTTP/1.1 200 OK\r\nContent-Length: 307200\r\n\r\n" + body)
    await step(connection.head())
    assert transport.paused  # the body waits for a sink, bounded
    chunks: list[bytes] = []
    connection.attach(chunks.append)
    assert await step(connection.wait())
    assert b"".join(chunks) == body
    assert not transport.paused


async def test_the_head_hook_runs_before_the_body_of_its_own_read() -> None:
    """``on_head`` is called as the head is parsed, once; a sink it attaches takes the body
    that came in the same read, in that same call: no turn of the loop in between."""
    connection, _ = _fed()
    seen: list[object] = []
    chunks: list[bytes] = []

    def on_head(answered: Connection) -> None:
        seen.append((answered.status, answered.has_head, answered.fields))
        answered.attach(chunks.append)

    connection.on_head = on_head
    head = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    connection.data_received(head + b"5\r\nhello\r\n")  # a stream, its first chunk
    assert seen == [(200, True, [("X-A", "1"), ("Transfer-Encoding", "chunked")])]
    assert chunks == [b"hello"]
    assert connection.on_head is None  # one exchange's: never the next one's


async def test_an_interim_response_does_not_call_the_head_hook() -> None:
    connection, _ = _fed()
    seen: list[int] = []
    connection.on_head = lambda answered: seen.append(answered.status)
    connection.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert seen == []
    connection.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert seen == [204]


@pytest.mark.parametrize("reads", [1, 8], ids=["one-read", "unfinished-over-reads"])
async def test_a_head_over_its_limit_is_refused(reads: int) -> None:
    """Whole in one read, or still unfinished once more than the limit arrived."""
    field = b"X-Big: " + b"a" * (MAX_HEAD_BYTES + 10)
    head = b"HTTP/1.1 200 OK\r\n" + field + (b"\r\n\r\n" if reads == 1 else b"")
    size = len(head) // reads + 1
    connection, transport = _fed(*(head[i : i + size] for i in range(0, len(head), size)))
    with pytest.raises(UpstreamProtocolError, match="response head too large"):
        await step(connection.head())
    assert transport.closed


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"SMTP ready\r\n\r\n", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 * MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
            id="head-too-large",
        ),
        pytest.param(b"", id="closed-without-answer"),
    ],
)
async def test_an_invalid_or_missing_response_is_upstream_unavailable(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams, response: bytes
) -> None:
    """What is not a valid HTTP/1.1 response head becomes the relay's 502, naming no header."""
    server = await wire(answer(response, keep=False))
    with pytest.raises(UpstreamUnavailable) as caught:
        await step(request(pool, "POST", server.url))
    assert caught.value.status == 502


async def test_addresses_are_resolved_once_and_tried_in_order(
    wire: Callable[..., Awaitable[WireServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """New connections reuse the resolved addresses, and a refusing address gives way to the
    next one."""
    server = await wire(
        answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    )
    port = URL(server.url).port
    loop = asyncio.get_running_loop()
    lookups: list[str] = []

    async def resolve(host: str, *_: object, **__: object) -> list[tuple[object, ...]]:
        lookups.append(host)
        refusing, listening = ("127.0.0.2", port), ("127.0.0.1", port)  # the server: .1 only
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", refusing),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", listening),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    pool = Upstreams(connect_timeout=5)
    for _ in range(3):
        connection, chunks = await fetch(pool, server.url)
        assert b"".join(chunks) == b"ok"
        connection.release()
    await pool.close()
    assert (lookups, server.connections) == (["localhost"], 3)


async def test_a_connect_that_never_completes_is_upstream_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection attempt the network never answers is the relay's 504 at the deadline."""
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()

    async def hang(*_: object, **__: object) -> None:
        await never

    monkeypatch.setattr(loop, "create_connection", hang)
    pool = Upstreams(connect_timeout=0.05)
    with pytest.raises(UpstreamTimeout) as caught:
        await step(request(pool, "GET", "http://127.0.0.1:9/"))
    assert caught.value.status == 504


async def test_a_second_response_in_the_same_packet_is_never_taken_for_the_next(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """Bytes after a complete response (here a whole extra response) make the connection
    unusable: the next request gets a new socket and its own answer, not the stray one."""
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
    server = await wire(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + stray))
    for _ in range(2):
        connection, chunks = await fetch(pool, server.url)
        assert b"".join(chunks) == b"ok"
        connection.release()
    assert server.connections == 2


async def test_an_interim_1xx_response_is_skipped(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """A 100 Continue before the real response is not taken for it."""
    server = await wire(
        answer(b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    )
    connection, chunks = await fetch(pool, server.url)
    assert (connection.status, b"".join(chunks)) == (200, b"ok")


def close_on_second_request() -> Script:
    """Answers the first request on each connection; closes on the second without answering,
    as an upstream does that closed an idle keep-alive connection just as it was reused."""
    # Keyed by the writer itself: an id() is reused once its object is freed, and would
    # make a new connection look like an old one.
    seen: dict[asyncio.StreamWriter, int] = {}

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        seen[writer] = seen.get(writer, 0) + 1
        if seen[writer] > 1:
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    return script


async def test_an_idempotent_request_is_resent_when_a_pooled_connection_was_gone(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """A GET on a reused socket that closes before any answer is sent again on a new one."""
    server = await wire(close_on_second_request())
    connection, _ = await fetch(pool, server.url, "GET", b"")
    connection.release()
    connection, chunks = await fetch(pool, server.url, "GET", b"")
    assert b"".join(chunks) == b"ok"
    assert server.connections == 2


async def test_the_head_hook_follows_a_request_resent_on_a_new_connection(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """``Sent.when_answered`` is called for the connection that answers, not the stale one."""
    server = await wire(close_on_second_request())
    connection, _ = await fetch(pool, server.url, "GET", b"")
    connection.release()
    target = URL(server.url, encoded=True)
    sent = await step(pool.send("GET", target, target.raw_path_qs, [], b"", 0))
    stale = sent.connection
    answered: list[Connection] = []
    sent.when_answered(answered.append)
    connection = await step(sent.response())
    assert connection is not stale
    assert answered == [connection]
    assert stale is not None
    assert stale.on_head is None  # closed: it lets go of the hook
    connection.close()


async def test_a_post_is_never_resent(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """A POST (a paid generation) on a reused socket that closes is a 502, not sent twice."""
    server = await wire(close_on_second_request())
    connection, _ = await fetch(pool, server.url)
    connection.release()
    with pytest.raises(UpstreamUnavailable):
        await step(request(pool, "POST", server.url, b"{}", 2))
    assert server.connections == 1


async def test_a_pooled_connection_the_upstream_closes_leaves_the_pool(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle connection the upstream closes is dropped when it closes, so the next request,
    even a POST (never resent), goes out on a new socket and is answered."""
    server = await wire(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", keep=False))
    gone = asyncio.Event()
    discard = pool.discard

    def discard_and_tell(connection: Connection) -> None:
        discard(connection)
        gone.set()

    monkeypatch.setattr(pool, "discard", discard_and_tell)
    connection, _ = await fetch(pool, server.url)
    connection.release()
    await step(gone.wait())
    connection, chunks = await fetch(pool, server.url)
    assert b"".join(chunks) == b"ok"
    assert server.connections == 2


async def test_pause_stops_delivery_until_resume(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """A sink that pauses makes wait() return False; the rest of the body follows resume()."""
    body = b"x" * (4 * 2**20)
    server = await wire(answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body))
    connection = await step(request(pool, "POST", server.url))
    received: list[bytes] = []

    def sink(chunk: bytes) -> None:
        received.append(chunk)
        connection.pause()

    connection.attach(sink)
    pauses = 0
    while not await step(connection.wait()):
        pauses += 1
        seen = len(received)
        assert connection.needs_drain
        connection.resume()
        assert len(received) == seen  # nothing arrived while paused
    assert b"".join(received) == body
    assert pauses >= 2


async def test_a_spooled_upload_is_sent_whole_with_its_length(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """An upload read from a file goes out in pieces under one Content-Length."""
    server = await wire(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    upload = bytes(range(256)) * (3 * UPLOAD_CHUNK // 256 + 7)
    connection = await step(
        request(pool, "POST", server.url + "/up", io.BytesIO(upload), len(upload))
    )
    connection.attach(lambda _: None)
    assert await step(connection.wait())
    head, _, sent = server.requests[0].partition(b"\r\n\r\n")
    assert sent == upload
    assert b"Content-Length: %d" % len(upload) in head


async def test_idle_connections_close_after_the_keepalive(
    wire: Callable[..., Awaitable[WireServer]],
) -> None:
    """A pooled connection unused for the keep-alive period is closed by the relay."""
    server = await wire(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    pool = Upstreams(connect_timeout=5, keepalive=0.05)
    connection, _ = await fetch(pool, server.url)
    connection.release()
    assert await step(server.closed.get()) == 1
    await pool.close()


async def test_closing_the_pool_closes_idle_connections(
    wire: Callable[..., Awaitable[WireServer]], pool: Upstreams
) -> None:
    """Shutting the app down closes what the pool keeps."""
    server = await wire(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    connection, _ = await fetch(pool, server.url)
    connection.release()
    await pool.close()
    assert await step(server.closed.get()) == 1


async def test_tls_upstream_is_verified(wire: Callable[..., Awaitable[WireServer]]) -> None:
    """An https upstream is reached over TLS with its certificate verified, and refused if not."""
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    server = await wire(
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret"), tls=server_context
    )
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    pool = Upstreams(connect_timeout=5, ssl_context=trusting)
    connection, chunks = await fetch(pool, server.url)
    assert b"".join(chunks) == b"secret"
    connection.release()
    await pool.close()

    untrusting = Upstreams(connect_timeout=5)  # the system's roots: the test CA is not one
    with pytest.raises(UpstreamUnavailable, match="SSLCertVerificationError"):
        await step(request(untrusting, "GET", server.url))
    await untrusting.close()


@pytest.mark.parametrize(
    ("method", "url", "size", "expected"),
    [
        (
            "GET",
            "http://up:8080/a?b=1",
            0,
            b"GET /a?b=1 HTTP/1.1\r\nHost: up:8080\r\nX-A: 1\r\n\r\n",
        ),
        (
            "POST",
            "https://up/v",
            0,
            b"POST /v HTTP/1.1\r\nHost: up\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "POST",
            "http://[::1]/v",
            5,
            b"POST /v HTTP/1.1\r\nHost: [::1]\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n",
        ),
        ("DELETE", "http://up/p/%2F", 0, b"DELETE /p/%2F HTTP/1.1\r\nHost: up\r\nX-A: 1\r\n\r\n"),
    ],
)
def test_request_head(method: str, url: str, size: int, expected: bytes) -> None:
    """The request line keeps the encoded path; Host omits a default port; bodies get a length."""
    target = URL(url, encoded=True)
    assert _request_head(method, target, target.raw_path_qs, [("X-A", "1")], size) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-A", "a\r\nX-Injected: 1"),
        ("X-A", "a\nb"),
        ("X-A", "a\rb"),
        ("X-A", "a\0b"),
        ("X-A", "\r\n"),
        ("X-Injected: 1\r\nX-A", "a"),
    ],
)
def test_request_head_refuses_line_breaks(name: str, value: str) -> None:
    """No header name or value can add a header line of its own."""
    with pytest.raises(ValueError, match="line break"):
        _request_head("GET", URL("http://up/"), "/", [(name, value)], 0)
