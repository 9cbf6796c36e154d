"""The relay's own server side (``relay.front``): framing, connection reuse and hand-off,
seen through a raw socket so every byte on the wire is the test's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest

from relay import front, server
from tests.conftest import (
    FAKE_KEY,
    SSE,
    STEP,
    FakeUpstream,
    Relay,
    RelayFactory,
    make_config,
    step,
)

STREAM = b"/api/v3/wavespeed-ai/any-llm/stream"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Wire:
    """One client connection, written and read byte for byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self) -> Answer:
        """Read one response: its head, then a body framed by length, chunks or close."""
        head = await step(self.reader.readuntil(b"\r\n\r\n"))
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        if status in (100, 204, 304):
            return Answer(status, headers, b"")
        if "content-length" in headers:
            body = await step(self.reader.readexactly(int(headers["content-length"])))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await step(self.reader.readuntil(b"\r\n")))[:-2], 16):
                body += (await step(self.reader.readexactly(size + 2)))[:-2]
            assert await step(self.reader.readexactly(2)) == b"\r\n"
        else:
            body = await step(self.reader.read())
        return Answer(status, headers, body)

    async def closed(self) -> bool:
        """True once the relay closed the connection (EOF with nothing more sent)."""
        return await step(self.reader.read()) == b""

    async def refused(self) -> tuple[int, str]:
        """Read a refusal after which the relay closes: its status and ``data.error``."""
        answer = await self.answer()
        assert answer.headers["connection"] == "close"
        assert await self.closed()
        return answer.status, json.loads(answer.body)["data"]["error"]


@contextlib.asynccontextmanager
async def connected(relay: Relay) -> AsyncIterator[Wire]:
    host, port = relay.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield Wire(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.fixture
async def wire(relay: Relay) -> AsyncIterator[Wire]:
    async with connected(relay) as wire:
        yield wire


def post(body: bytes = b"{}", path: bytes = STREAM, extra: bytes = b"") -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n%b\r\n%b" % (
        path,
        len(body),
        extra,
        body,
    )


async def test_one_connection_carries_request_after_request(
    upstream: FakeUpstream, wire: Wire
) -> None:
    """Keep-alive: each response ends cleanly and the next request on the connection is
    answered too."""
    upstream.respond(200, b'{"ok":1}', {"Content-Type": "application/json"})
    for _ in range(3):
        wire.send(post())
        answer = await wire.answer()
        assert (answer.status, answer.body) == (200, b'{"ok":1}')
        assert "connection" not in answer.headers
    assert len(upstream.seen) == 3


async def test_a_chunked_request_body_is_forwarded_decoded(
    upstream: FakeUpstream, wire: Wire
) -> None:
    upstream.respond(200, b"ok")
    wire.send(
        b"POST %b HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'3\r\n{"a\r\n4\r\n":1}\r\n0\r\n\r\n' % STREAM
    )
    assert (await wire.answer()).status == 200
    assert upstream.seen[0].body == b'{"a":1}'
    assert upstream.seen[0].headers["content-length"] == ["7"]
    assert "transfer-encoding" not in upstream.seen[0].headers


async def test_expect_100_continue_is_answered_when_the_body_is_read(
    upstream: FakeUpstream, wire: Wire
) -> None:
    """The client holds its body until the relay asks for it; a request refused before
    its body is read gets no ``100 Continue``, and its connection closes."""
    upstream.respond(200, b"ok")
    wire.send(
        b"POST %b HTTP/1.1\r\nHost: relay\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        % STREAM
    )
    assert (await wire.answer()).status == 100
    wire.send(b"{}")
    answer = await wire.answer()
    assert answer.status == 200
    assert upstream.seen[0].body == b"{}"

    wire.send(
        b"POST /nowhere HTTP/1.1\r\nHost: relay\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    refused = await wire.answer()
    assert refused.status == 404
    assert refused.headers["connection"] == "close"
    assert await wire.closed()


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 1\r\nContent-Length: 2\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",  # llhttp would undo the chunking alone
    ],
    ids=["two-lengths", "length-and-chunked", "coded-body"],
)
async def test_a_malformed_request_gets_the_envelope_and_the_connection_closes(
    upstream: FakeUpstream, wire: Wire, framing: bytes
) -> None:
    wire.send(b"POST %b HTTP/1.1\r\nHost: relay\r\n%b\r\n0\r\n\r\n" % (STREAM, framing))
    assert await wire.refused() == (400, "bad_request")
    assert not upstream.seen


async def test_an_oversized_request_head_is_refused(upstream: FakeUpstream, wire: Wire) -> None:
    wire.send(b"POST %b HTTP/1.1\r\nX-Big: %b" % (STREAM, b"a" * (front.MAX_HEAD_BYTES + 1)))
    assert await wire.refused() == (400, "bad_request")
    assert not upstream.seen


async def test_requests_pipelined_in_one_write_end_the_connection_after_the_first(
    upstream: FakeUpstream, wire: Wire
) -> None:
    """HTTP lets a server close instead of answering pipelined requests; clients retry."""
    upstream.respond(200, b"one")
    wire.send(post() + post())
    answer = await wire.answer()
    assert (answer.status, answer.body) == (200, b"one")
    assert answer.headers["connection"] == "close"  # the client learns it from the answer
    assert await wire.closed()
    assert len(upstream.seen) == 1


async def test_a_request_sent_while_a_stream_runs_is_answered_after_it(
    upstream: FakeUpstream, wire: Wire
) -> None:
    feed = upstream.stream()
    wire.send(post())
    head = await step(wire.reader.readuntil(b"\r\n\r\n"))
    assert b"200 OK" in head
    wire.send(post())  # the next request, before the stream's end
    feed.send(b"data: 1\n\n")
    assert await step(wire.reader.readuntil(b"\r\n")) == b"9\r\n"
    upstream.respond(200, b"second")
    feed.end()
    assert await step(wire.reader.readuntil(b"0\r\n\r\n")) == b"data: 1\n\n\r\n0\r\n\r\n"
    answer = await wire.answer()
    assert (answer.status, answer.body) == (200, b"second")


async def test_an_http_1_0_client_gets_the_stream_ended_by_close(
    upstream: FakeUpstream, wire: Wire
) -> None:
    feed = upstream.stream()
    wire.send(b"POST %b HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}" % STREAM)
    feed.send(b"data: 1\n\n")
    feed.end()
    answer = await wire.answer()
    assert answer.status == 200
    assert answer.headers["connection"] == "close"
    assert "transfer-encoding" not in answer.headers
    assert answer.body == b"data: 1\n\n"


async def test_a_client_asking_to_close_gets_its_connection_closed(
    upstream: FakeUpstream, wire: Wire
) -> None:
    upstream.respond(200, b"ok")
    wire.send(post(extra=b"Connection: close\r\n"))
    answer = await wire.answer()
    assert answer.headers["connection"] == "close"
    assert await wire.closed()


async def test_the_apps_own_routes_are_handed_to_aiohttp_one_request_per_connection(
    relay: Relay, upstream: FakeUpstream, wire: Wire
) -> None:
    """``/healthz`` is aiohttp's; the connection closes after it, so the next request
    (on a new connection) reaches the front again. A method aiohttp does not serve there
    stays with the relay, which answers as for any path it does not relay."""
    wire.send(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    answer = await wire.answer()
    assert (answer.status, json.loads(answer.body)) == (200, {"status": "ok"})
    assert answer.headers["connection"] == "close"
    assert await wire.closed()

    async with connected(relay) as again:
        again.send(post(path=b"/healthz"))
        refused = await again.answer()
    assert refused.status == 404
    assert json.loads(refused.body)["data"]["error"] == "not_found"
    assert "connection" not in refused.headers


async def test_an_idle_connection_is_closed(
    monkeypatch: pytest.MonkeyPatch, make_relay: RelayFactory, upstream: FakeUpstream
) -> None:
    monkeypatch.setattr(front, "KEEPALIVE_SECONDS", 0.05)
    relay = await make_relay()
    upstream.respond(200, b"ok")
    async with connected(relay) as wire:
        wire.send(post())
        assert (await wire.answer()).status == 200
        assert await wire.closed()  # nothing more was asked for


async def test_the_stream_head_says_what_the_relay_adds(upstream: FakeUpstream, wire: Wire) -> None:
    """A streamed response: the upstream's headers (filtered), chunked framing, a Date,
    the request id, and never the key."""
    feed = upstream.stream(SSE)
    wire.send(post(extra=b"X-Request-ID: front-test-1\r\n"))
    feed.send(b"data: 1\n\n")
    feed.end()
    answer = await wire.answer()
    assert answer.headers["content-type"] == SSE
    assert answer.headers["transfer-encoding"] == "chunked"
    assert answer.headers["x-request-id"] == "front-test-1"
    assert answer.headers["x-accel-buffering"] == "no"
    assert "date" in answer.headers
    assert FAKE_KEY not in json.dumps(answer.headers)


async def test_a_body_that_paused_reading_leaves_the_connection_usable(
    upstream: FakeUpstream, wire: Wire
) -> None:
    """A body past the front's high-water mark pauses the socket while the relay reads it;
    the connection reads again for the next request."""
    upstream.respond(200, b"ok")
    big = b'{"x":"%b"}' % (b"a" * (2 * front.BODY_HIGH_WATER))
    wire.send(post(big))
    assert (await wire.answer()).status == 200
    assert upstream.seen[0].body == big
    wire.send(post())
    assert (await wire.answer()).status == 200


async def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A chunked body gives no size up front: it is refused once it passes the limit, and
    the connection closes (the rest of the body is never read)."""
    relay = await make_relay(max_body_bytes=10)
    async with connected(relay) as wire:
        wire.send(
            b"POST %b HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'8\r\n{"a":"12\r\n8\r\n34567"}\r\n' % STREAM  # and never the last chunk
        )
        assert await wire.refused() == (413, "payload_too_large")
    assert not upstream.seen


async def test_draining_answers_kept_alive_connections_then_closes_them(
    upstream: FakeUpstream,
) -> None:
    """After the stop signal, a request on a connection kept alive from before gets 503
    ``shutting_down`` while an open stream finishes; then every connection is closed."""
    feed = upstream.stream()
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    config = make_config(upstream.url, port=0, shutdown_grace=STEP)
    serving = asyncio.ensure_future(
        server.serve(config, stop=stop, admin=False, on_ready=lambda url, _: ready.set_result(url))
    )
    host, port = (await step(ready)).removeprefix("http://").split(":")
    streaming = Wire(*await asyncio.open_connection(host, int(port)))
    idle = Wire(*await asyncio.open_connection(host, int(port)))
    try:
        streaming.send(post())
        feed.send(b"data: 1\n\n")
        assert await step(streaming.reader.readuntil(b"data: 1\n\n\r\n"))
        idle.send(post(path=b"/nowhere"))
        assert (await idle.answer()).status == 404  # and the connection stays open

        stop.set()  # the server wakes to drain before this loop reads the next request
        idle.send(post())
        refused = await idle.answer()
        assert refused.status == 503
        assert json.loads(refused.body)["data"]["error"] == "shutting_down"

        feed.end()
        assert await step(streaming.reader.readuntil(b"0\r\n\r\n")) == b"0\r\n\r\n"
        await step(serving)
        assert await idle.closed()
        assert await streaming.closed()
    finally:
        for wire in (streaming, idle):
            wire.writer.close()
        stop.set()
        await asyncio.wait_for(serving, STEP)


def refused_upload(size: int) -> bytes:
    """The head of an upload the relay refuses at once: its Content-Length is over the limit
    (of the relays below)."""
    return b"POST %b HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n\r\n" % (STREAM, size)


async def test_a_refused_upload_still_gets_its_answer_while_the_client_sends(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A request refused before its body is read (here by its Content-Length) is answered
    at once, and the relay then only shuts its side and discards what still arrives: were
    it to close, the client's kernel would meet the rest of the upload with a reset that
    destroys the answer before a client that reads after sending (a browser, curl) sees it.
    """
    relay = await make_relay(max_body_bytes=1024)
    host, port = relay.url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    body = b"x" * (4 * 1024 * 1024)
    with socket.create_connection((host, int(port))) as client:
        client.setblocking(False)
        await loop.sock_sendall(client, refused_upload(len(body)) + body[:65536])
        answered: asyncio.Future[None] = loop.create_future()
        loop.add_reader(client.fileno(), lambda: answered.done() or answered.set_result(None))
        try:
            await step(answered)  # the answer waits, unread, in the client's socket
        finally:
            loop.remove_reader(client.fileno())
        for start in range(65536, len(body), 65536):  # the rest of the upload, then read
            await step(loop.sock_sendall(client, body[start : start + 65536]))
        received = b""
        while data := await step(loop.sock_recv(client, 65536)):
            received += data
    head, _, answer = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(answer)["data"]["error"] == "payload_too_large"
    assert not upstream.seen


@pytest.fixture
def connections_lost(monkeypatch: pytest.MonkeyPatch) -> asyncio.Queue[None]:
    """One item each time the relay's side of a client connection is gone."""
    lost: asyncio.Queue[None] = asyncio.Queue()
    connection_lost = front.Front.connection_lost

    def spy(self: front.Front, exc: Exception | None) -> None:
        connection_lost(self, exc)
        lost.put_nowait(None)

    monkeypatch.setattr(front.Front, "connection_lost", spy)
    return lost


async def test_a_lingering_connection_closes_when_the_client_does(
    monkeypatch: pytest.MonkeyPatch, make_relay: RelayFactory, connections_lost: asyncio.Queue[None]
) -> None:
    monkeypatch.setattr(front, "LINGER_GAP_SECONDS", 60.0)  # only the client ends it here
    relay = await make_relay(max_body_bytes=1024)
    async with connected(relay) as wire:
        wire.send(refused_upload(1 << 20) + b"{")
        assert (await wire.answer()).status == 413
        assert await wire.closed()  # the relay's side is shut: the answer is all
        wire.send(b"more of the body")
        wire.writer.write_eof()  # the client is done too
        await step(connections_lost.get())


async def test_a_lingering_connection_closes_once_the_client_goes_quiet(
    monkeypatch: pytest.MonkeyPatch, make_relay: RelayFactory, connections_lost: asyncio.Queue[None]
) -> None:
    monkeypatch.setattr(front, "LINGER_GAP_SECONDS", 0.05)
    relay = await make_relay(max_body_bytes=1024)
    async with connected(relay) as wire:
        wire.send(refused_upload(1 << 20) + b"{")
        assert (await wire.answer()).status == 413
        assert await wire.closed()
        await step(connections_lost.get())  # the client neither sent more nor closed


@pytest.mark.parametrize(
    "rest",
    [b"zz\r\nnot a chunk size\r\n", b"3\r\nabcdef"],
    ids=["bad-size", "overlong-chunk"],
)
async def test_a_body_that_breaks_its_framing_gets_400_and_the_connection_closes(
    upstream: FakeUpstream, wire: Wire, rest: bytes
) -> None:
    wire.send(
        b"POST %b HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"a"\r\n%b' % (STREAM, rest)
    )
    assert await wire.refused() == (400, "bad_request")
    assert not upstream.seen


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Content-Length: 13\r\n", b'{"prompt":1}\n'),
        (b"Transfer-Encoding: chunked\r\n", b'6\r\n{"prom\r\n7\r\npt":1}\n\r\n0\r\n\r\n'),
    ],
    ids=["sized", "chunked"],
)
@pytest.mark.parametrize("expect", [False, True], ids=["at-once", "after-100-continue"])
async def test_an_upgrade_offer_is_ignored_and_the_body_relayed(
    upstream: FakeUpstream, wire: Wire, framing: bytes, body: bytes, expect: bool
) -> None:
    """``curl --http2`` on a plain http URL offers h2c on a POST with its body. The relay
    does not switch protocols: it serves the request as HTTP/1.1, body and all (llhttp
    would have taken the body for the new protocol's bytes), and drops the offer's headers.
    With ``Expect: 100-continue`` the body follows the head only once the relay asks.
    """
    upstream.respond(200, b"ok")
    wire.send(
        b"POST %b HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n%b%b\r\n"
        % (STREAM, framing, b"Expect: 100-continue\r\n" if expect else b"")
    )
    if expect:
        assert (await wire.answer()).status == 100
    wire.send(body)
    answer = await wire.answer()
    assert (answer.status, answer.body) == (200, b"ok")
    seen = upstream.seen[0]
    assert seen.body == b'{"prompt":1}\n'
    assert not {"upgrade", "http2-settings", "connection"} & set(seen.headers)


async def test_a_request_pipelined_after_an_upgrade_offers_body_is_not_read_into_it(
    upstream: FakeUpstream, wire: Wire
) -> None:
    upstream.respond(200, b"ok")
    wire.send(
        b"POST %b HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        b'Content-Length: 8\r\n\r\n{"a":1}\n' % STREAM + post(b'{"b":2}')
    )
    assert (await wire.answer()).status == 200
    assert await wire.closed()
    assert [seen.body for seen in upstream.seen] == [b'{"a":1}\n']


async def test_a_body_that_stops_arriving_fails_with_408(
    monkeypatch: pytest.MonkeyPatch, upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A client that dies mid-upload (a phone that lost its network) says nothing more:
    the request fails once its body pauses too long, and frees what it held."""
    monkeypatch.setattr(front, "BODY_GAP_SECONDS", 0.05)
    relay = await make_relay(max_streams_per_client=1)
    async with connected(relay) as wire:
        wire.send(b'POST %b HTTP/1.1\r\nHost: relay\r\nContent-Length: 20\r\n\r\n{"a"' % STREAM)
        assert await wire.refused() == (408, "request_timeout")
    assert relay.metric("relay_requests_total", route="stream", model="-", code="408") == 1
    assert not upstream.seen
    upstream.respond(200, b"ok")
    async with connected(relay) as wire:  # the stalled request's stream slot is free again
        wire.send(post())
        assert (await wire.answer()).status == 200


async def test_a_chunked_bodys_trailers_are_dropped_not_carried_into_the_next_request(
    upstream: FakeUpstream, wire: Wire
) -> None:
    """llhttp reports trailer fields like header fields, after the head. They belong to
    no request the relay forwards (the body goes upstream with a length), and above all
    not to the next request on the connection."""
    upstream.respond(200, b"ok")
    wire.send(
        b"POST %b HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nX-Request-ID: from-a-trailer\r\nX-Smuggled: 1\r\n\r\n" % STREAM
    )
    first = await wire.answer()
    wire.send(post())
    second = await wire.answer()
    assert (first.status, second.status) == (200, 200)
    assert "from-a-trailer" not in (first.headers["x-request-id"], second.headers["x-request-id"])
    assert not any("x-smuggled" in seen.headers for seen in upstream.seen)
    assert [seen.body for seen in upstream.seen] == [b"{}", b"{}"]


async def test_an_upgrade_offer_without_a_body_is_served_and_the_connection_closes(
    upstream: FakeUpstream, wire: Wire
) -> None:
    """A WebSocket handshake on a relayed path gets an HTTP/1.1 answer, never a 101; what
    follows the head is not HTTP, so the connection ends after the answer."""
    upstream.respond(200, b"ok")
    wire.send(post(b"", extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n"))
    answer = await wire.answer()
    assert (answer.status, answer.body) == (200, b"ok")
    assert answer.headers["connection"] == "close"
    assert await wire.closed()
    assert not {"upgrade", "connection"} & set(upstream.seen[0].headers)


@dataclass
class Timer:
    """A timer :class:`ManualClock` keeps instead of the loop."""

    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """Stands in for one front's loop: ``time()`` is the test's, and ``call_at`` only
    records the timer, which the test fires with :meth:`fire`. Everything else is the loop's.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = 0.0
        self.timer: Timer | None = None

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        self.timer = Timer(when, callback)
        return self.timer

    def fire(self) -> float:
        """Run the latest timer at its time, as the loop would; returns that time."""
        timer, self.timer = self.timer, None
        assert timer is not None
        assert not timer.cancelled
        self.now = timer.when
        timer.callback()
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


async def test_a_lingering_connection_closes_at_the_cap_however_long_the_client_sends(
    monkeypatch: pytest.MonkeyPatch, make_relay: RelayFactory, connections_lost: asyncio.Queue[None]
) -> None:
    """A client that keeps trickling bytes into a refused upload is never quiet for
    ``LINGER_GAP_SECONDS``, so only ``LINGER_SECONDS`` ends the linger: the relay's
    timers run on a clock the test moves, and the client sends within every gap."""
    clock = ManualClock(asyncio.get_running_loop())
    heard: asyncio.Queue[float] = asyncio.Queue()
    connection_made, data_received = front.Front.connection_made, front.Front.data_received

    def on_clock(self: front.Front, transport: asyncio.BaseTransport) -> None:
        self._loop = clock  # type: ignore[assignment]
        connection_made(self, transport)

    def spy(self: front.Front, data: bytes) -> None:
        data_received(self, data)
        heard.put_nowait(self._heard)

    monkeypatch.setattr(front.Front, "connection_made", on_clock)
    monkeypatch.setattr(front.Front, "data_received", spy)
    relay = await make_relay(max_body_bytes=1024)
    async with connected(relay) as wire:
        wire.send(refused_upload(1 << 20))
        assert (await wire.answer()).status == 413
        assert await wire.closed()  # the relay's side is shut, and it lingers from time 0
        await step(heard.get())  # the head
        fired = [0.0]
        while fired[-1] < front.LINGER_SECONDS:  # the relay still reads: the client sends
            clock.now += front.LINGER_GAP_SECONDS - 1  # within the gap
            wire.send(b"x" * 1024)
            assert await step(heard.get()) == clock.now
            fired.append(clock.fire())
        await step(connections_lost.get())
    assert fired[-1] == front.LINGER_SECONDS  # closed by the cap, at the cap
    assert len(fired) > 3  # after the gap's timer had fired and been put off a few times


async def test_a_last_response_survives_what_the_client_sent_after_its_request(
    monkeypatch: pytest.MonkeyPatch, upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A client that asked for the connection to close and still sent more while its
    stream ran (a request it will retry elsewhere) may send yet more after the response:
    the relay lingers rather than close, or that would be met with a reset that destroys
    the response's unread end in the client's socket."""
    answered: asyncio.Queue[None] = asyncio.Queue()
    held: asyncio.Queue[None] = asyncio.Queue()
    on_answered, data_received = front.Front._answered, front.Front.data_received

    def answered_spy(self: front.Front, task: asyncio.Task[None]) -> None:
        on_answered(self, task)
        answered.put_nowait(None)

    def held_spy(self: front.Front, data: bytes) -> None:
        data_received(self, data)
        if self._pending:
            held.put_nowait(None)

    monkeypatch.setattr(front.Front, "_answered", answered_spy)
    monkeypatch.setattr(front.Front, "data_received", held_spy)
    relay = await make_relay()
    feed = upstream.stream()
    host, port = relay.url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    with socket.create_connection((host, int(port))) as client:
        client.setblocking(False)
        await loop.sock_sendall(client, post(extra=b"Connection: close\r\n"))
        feed.send(b"data: 1\n\n")
        received = b""
        while not received.endswith(b"data: 1\n\n\r\n"):  # the stream runs
            received += await step(loop.sock_recv(client, 65536))
        await step(loop.sock_sendall(client, post()))  # so this request waits
        await step(held.get())
        feed.end()
        await step(answered.get())  # the response's end now waits, unread, in the client
        for _ in range(16):
            await step(loop.sock_sendall(client, b"x" * 4096))
        while data := await step(loop.sock_recv(client, 65536)):
            received += data
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"  # to its end, then the relay's close
    assert len(upstream.seen) == 1


class _Server:
    def label(self, request: front.Request) -> list[tuple[str, str]]:
        return [("Vary", "Origin")]


class _Front:
    transport = None
    peer = "127.0.0.1"
    server = _Server()


def _head(
    fields: list[tuple[str, str]], status: int = 200, version: tuple[int, int] = (1, 1)
) -> list[str]:
    request = front.Request(cast(front.Front, _Front()), "POST", "/", version, [])
    request.received = True
    request.start(status, "OK", fields)
    return request.take_head().decode().split("\r\n")


def test_the_relay_frames_a_response_itself_whatever_fields_it_is_given() -> None:
    """Framing and connection fields given to ``start`` are dropped for the relay's own;
    the others keep their order, then come the labels and a Date."""
    lines = _head(
        [
            ("Content-Type", "text/event-stream"),
            ("Transfer-Encoding", "gzip"),
            ("connection", "upgrade"),
            ("X-A", "1"),
        ]
    )
    assert lines[0] == "HTTP/1.1 200 OK"
    assert lines[1:5] == [
        "Content-Type: text/event-stream",
        "X-A: 1",
        "Transfer-Encoding: chunked",
        "Vary: Origin",
    ]
    assert lines[5].startswith("Date: ")
    assert lines[6:] == ["", ""]


@pytest.mark.parametrize(
    ("fields", "status", "expected"),
    [
        # A length frames the body; the upstream's own Date is kept.
        (
            [("content-length", "2"), ("Date", "then")],
            200,
            ["content-length: 2", "Content-Type: application/octet-stream"],
        ),
        # No body, no type; never a length on a 204.
        ([("Content-Length", "0")], 200, ["Content-Length: 0"]),
        ([("Content-Length", "5")], 204, []),
    ],
)
def test_a_response_head_keeps_a_length_and_adds_only_what_is_missing(
    fields: list[tuple[str, str]], status: int, expected: list[str]
) -> None:
    lines = _head(fields, status)
    kept = [line for line in lines[1:] if line and not line.startswith(("Vary:", "Date: "))]
    assert kept == expected
    dates = [line for line in lines if line.startswith("Date: ")]
    assert len(dates) == 1
    assert (dates == ["Date: then"]) is any(name == "Date" for name, _ in fields)
    assert not any(line.lower().startswith("transfer-encoding") for line in lines)


def test_an_http_1_0_response_without_a_length_ends_with_its_connection() -> None:
    lines = _head([("Content-Type", "text/plain")], version=(1, 0))
    assert "Connection: close" in lines
    assert not any(line.startswith("Transfer-Encoding") for line in lines)
