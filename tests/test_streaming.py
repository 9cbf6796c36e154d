"""The pump: no buffering, byte identity, backpressure, disconnects and cut streams."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import tracemalloc
from asyncio import selector_events
from collections.abc import Iterable

import aiohttp
import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import proxy, pump
from relay.connection import Connection
from relay.speedups import ForwardPy
from relay.state import STATE
from tests.conftest import (
    SSE,
    STEP,
    FakeUpstream,
    Relay,
    RelayFactory,
    give_up_before_headers,
    read_all,
    step,
)

STREAM = "/api/v3/wavespeed-ai/any-llm/stream"
SPEECH = "/api/v3/minimax/speech-02-hd/stream"


@pytest.fixture(params=["compiled", "python"])
def sink(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream's sink as built (C where it was), or its Python twin (no C compiler)."""
    if request.param == "python":
        monkeypatch.setattr(pump, "Forward", ForwardPy)
        monkeypatch.setattr(pump, "COMPILED", False)


@pytest.mark.parametrize(
    ("content_type", "make_chunk"),
    [
        (SSE, lambda i: f'data: {{"type":"progress","percentage":{i}}}\n\n'.encode()),
        ("audio/mpeg", lambda i: bytes([i % 256]) * (100 + i)),
    ],
    ids=["sse", "binary"],
)
@pytest.mark.usefixtures("sink")
async def test_lockstep_each_chunk_arrives_before_the_next_exists(
    upstream: FakeUpstream, relay: Relay, content_type, make_chunk
) -> None:
    """Each of 50 chunks reaches the client before the upstream produces the next one."""
    feed = upstream.stream(content_type)
    response = await step(relay.client.post(STREAM, data=b"{}"))
    assert response.status == 200
    assert response.headers["Content-Type"] == content_type
    for i in range(50):
        chunk = make_chunk(i)
        feed.send(chunk)
        assert await step(response.content.readexactly(len(chunk))) == chunk
    feed.end()
    assert await read_all(response) == b""


async def test_relay_headers_are_sent_before_the_first_chunk(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """The client gets the status and headers while the upstream has sent no body yet."""
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    assert response.status == 200
    assert response.headers["X-Accel-Buffering"] == "no"
    feed.end()
    await read_all(response)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    payload=st.binary(min_size=0, max_size=200_000),
    cuts=st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=30),
)
def test_random_binary_payloads_arrive_identical(payload: bytes, cuts: list[int]) -> None:
    """Any payload, cut into any chunk sizes upstream, arrives byte-identical."""
    asyncio.run(_relay_chunks(payload, cuts))


async def _relay_chunks(payload: bytes, cuts: list[int]) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from relay.app import create_app
    from tests.conftest import RelayServer, make_config

    chunks, i = [], 0
    for size in cuts * (len(payload) // max(1, sum(cuts)) + 1):
        if i >= len(payload):
            break
        chunks.append(payload[i : i + size])
        i += size

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    up = web.Application()
    up.router.add_post("/{tail:.*}", handler)
    async with TestServer(up, host="127.0.0.1") as up_server:
        app = create_app(make_config(str(up_server.make_url("")).rstrip("/")))
        async with TestClient(RelayServer(app, host="127.0.0.1")) as client:
            response = await step(client.post(SPEECH, data=b"{}"))
            assert response.headers["Content-Type"] == "application/octet-stream"
            assert await read_all(response) == payload


async def test_content_length_and_encoding_pass_through(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """A gzip body with a Content-Length is relayed as is: not decompressed, not re-framed."""
    import gzip

    body = gzip.compress(b'{"code":200}' * 100)
    upstream.respond(200, body, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    response = await step(relay.client.post(STREAM, data=b"{}"))
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Content-Length"] == str(len(body))
    assert await read_all(response) == body


@pytest.mark.usefixtures("sink")
async def test_a_slow_client_pauses_the_upstream_and_memory_stays_bounded(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """While the client reads nothing, the upstream stops being read; then all bytes arrive."""
    block = bytes(range(256)) * 256  # 64 KiB, one object reused
    total_blocks = 512  # 32 MiB offered: far more than every socket buffer on the way
    feed = upstream.stream("application/octet-stream")
    for _ in range(total_blocks):
        feed.send(block)
    feed.end()

    # A plain socket: "reads nothing" then means nothing reads it, not a client library's
    # buffer that may still be filling.
    loop = asyncio.get_running_loop()
    host, port = relay.url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setblocking(False)
        await step(loop.sock_connect(sock, (host, int(port))))
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            await step(loop.sock_sendall(sock, _request(SPEECH, b"{}")))
            # Waiting for nothing to happen is the point here: poll until the upstream's
            # progress has stood still for a while, bounded by STEP.
            await step(_until_stalled(upstream))
            grown = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        assert upstream.written < total_blocks * len(block), "the upstream was never paused"
        assert grown < 2 * 1024 * 1024, f"{grown} bytes held in Python while the client stalled"

        body = _Body()
        parser = httptools.HttpResponseParser(body)
        while not body.complete:
            data = await step(loop.sock_recv(sock, 2**16))
            assert data, "the relay closed the connection before the body's end"
            parser.feed_data(data)
    assert parser.get_status_code() == 200
    assert body.size == total_blocks * len(block)
    assert body.digest.digest() == hashlib.sha256(block * total_blocks).digest()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # the spy sits on asyncio's transport
@pytest.mark.parametrize("unsafe", [False, True], ids=["writelines", "write-only"])
async def test_where_writelines_ignores_flow_control_chunks_go_through_write(
    upstream: FakeUpstream, relay: Relay, monkeypatch: pytest.MonkeyPatch, unsafe: bool
) -> None:
    """On CPython 3.12.0-3.12.8 and 3.13.0-3.13.1 asyncio's writelines never pauses the
    protocol (CVE-2024-12254): there the forwarder frames even a large chunk into one
    write(). The test sets the flag itself, so both paths run on any Python; the control
    case shows that large chunks otherwise do take writelines."""
    monkeypatch.setattr(pump, "_WRITELINES_UNSAFE", unsafe)
    transport_class = selector_events._SelectorSocketTransport
    writelines = transport_class.writelines
    calls: list[int] = []

    def spy(self: asyncio.WriteTransport, data: Iterable[bytes]) -> None:
        data = list(data)
        calls.append(sum(len(piece) for piece in data))
        writelines(self, data)

    monkeypatch.setattr(transport_class, "writelines", spy)
    chunk = bytes(range(256)) * 64  # 16 KiB: past the forwarder's small-chunk framing
    feed = upstream.stream("application/octet-stream")
    response = await step(relay.client.post(SPEECH, data=b"{}"))
    feed.send(chunk)
    assert await step(response.content.readexactly(len(chunk))) == chunk
    feed.end()
    assert await read_all(response) == b""
    framed = len(b"%x\r\n" % len(chunk)) + len(chunk) + 2
    assert calls == ([] if unsafe else [framed])


def _request(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Body:
    """httptools callbacks: a response body's size and digest, and whether it ended."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.complete = False

    def on_body(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.size += len(chunk)

    def on_message_complete(self) -> None:
        self.complete = True


async def _until_stalled(upstream: FakeUpstream) -> None:
    # A stall is the absence of progress, which no event signals: poll until the upstream's
    # writes have not moved for 15 looks in a row (callers bound this with step()).
    last, still = -1, 0
    while still < 15:
        await asyncio.sleep(0.02)
        still = still + 1 if upstream.written == last else 0
        last = upstream.written


async def test_client_leaving_while_upstream_is_silent_closes_the_upstream(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """A client that leaves mid-stream, while the upstream says nothing, disconnects it."""
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    feed.send(b"data: 1\n\n")
    assert await step(response.content.readexactly(9)) == b"data: 1\n\n"
    response.close()
    await step(upstream.disconnected.wait())


async def test_client_leaving_while_upstream_writes_closes_the_upstream(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """A client that leaves while the upstream keeps writing disconnects the upstream."""
    feed = upstream.stream("audio/mpeg")
    for _ in range(2000):
        feed.send(b"\xff" * 8192)
    response = await step(relay.client.post(SPEECH, data=b"{}"))
    await step(response.content.readexactly(8192))
    response.close()
    await step(upstream.disconnected.wait())
    assert upstream.written < 2000 * 8192


async def test_client_leaving_before_headers_closes_the_upstream(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """A client that gives up while the upstream has not answered yet disconnects it."""
    await give_up_before_headers(relay, upstream, STREAM)


@pytest.mark.parametrize("content_type", [SSE, "audio/wav"])
async def test_upstream_dying_mid_body_aborts_the_client(
    upstream: FakeUpstream, relay: Relay, content_type: str
) -> None:
    """An upstream cut after headers reaches the client as an error, never a clean end."""
    feed = upstream.stream(content_type)
    response = await step(relay.client.post(STREAM, data=b"{}"))
    feed.send(b"data: partial\n\n")
    assert await step(response.content.readexactly(15)) == b"data: partial\n\n"
    feed.abort()
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all(response)


async def test_upstream_short_of_its_content_length_aborts_the_client(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """A body shorter than the upstream's Content-Length is not passed off as complete."""
    feed = upstream.stream("audio/mpeg", headers={"Content-Length": "1000"})
    response = await step(relay.client.post(SPEECH, data=b"{}"))
    feed.send(b"\x00" * 400)
    feed.abort()
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all(response)


async def test_idle_upstream_is_cut_after_the_idle_deadline(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """An upstream silent past RELAY_IDLE_TIMEOUT mid-stream: client aborted, upstream closed."""
    relay = await make_relay(idle_timeout=0.2)
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    feed.send(b"data: 1\n\n")
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all(response)
    await step(upstream.disconnected.wait())


async def test_streams_past_the_maximum_duration_are_cut(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A stream still busy at RELAY_MAX_STREAM_SECONDS is cut: the client sees an error."""
    relay = await make_relay(max_stream_seconds=0.3, first_byte_timeout=0.3, idle_timeout=5)
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))

    async def keep_busy() -> None:
        while True:
            feed.send(b"data: tick\n\n")
            await response.content.readexactly(12)

    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(keep_busy(), STEP)
    await step(upstream.disconnected.wait())


@pytest.mark.parametrize("ending", ["completed", "client_left", "upstream_cut"])
@pytest.mark.usefixtures("sink")
async def test_a_finished_stream_leaves_no_cycles_for_the_collector(
    upstream: FakeUpstream, relay: Relay, ending: str
) -> None:
    """However a stream ends, its objects are freed by reference counting: none of the
    relay's are left in cycles (a full collection walks them all and stalls every stream)."""
    gc.collect()
    flags = gc.get_debug()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector finds, to look at it
    try:
        feed = upstream.stream()
        response = await step(relay.client.post(STREAM, data=b"{}"))
        feed.send(b"data: 1\n\n")
        await step(response.content.readexactly(9))
        if ending == "completed":
            feed.end()
            await step(read_all(response))
        elif ending == "client_left":
            response.close()
            await step(upstream.disconnected.wait())
        else:
            feed.abort()
            with pytest.raises(aiohttp.ClientPayloadError):
                await step(read_all(response))
        assert await relay.app[STATE].wait_streams_closed(STEP)
        gc.collect()
        cycles = [
            type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("relay")
        ]
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
        gc.enable()
    assert cycles == []


async def test_a_stream_lets_go_of_its_request_body_once_sent(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """A large request body is not kept for the life of the stream it started."""
    body = b'{"prompt": "' + b"x" * 900_000 + b'"}'
    feed = upstream.stream()
    tracemalloc.start()
    try:
        response = await step(relay.client.post(STREAM, data=body))
        feed.send(b"data: 1\n\n")
        await step(response.content.readexactly(9))
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = [
        stat
        for stat in snapshot.statistics("lineno")
        if stat.size >= len(body) and "/relay/" in stat.traceback[0].filename
    ]
    assert held == []


class _Recorded:
    """A stand-in for any object: the attributes it is given, and any other name is a
    method that records its call."""

    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: self.calls.append(name)


def _opening(cutting: bool, start: object) -> tuple[proxy._Opening, _Recorded]:
    request = _Recorded(start=start)
    outgoing = _Recorded()
    watchdog = _Recorded(cutting=cutting)
    exchange = _Recorded(request_id="r1")
    opening = proxy._Opening(
        request,  # type: ignore[arg-type]
        _Recorded(sse_heartbeat=None),  # type: ignore[arg-type]
        exchange,  # type: ignore[arg-type]
        outgoing,  # type: ignore[arg-type]
        _Recorded(),  # type: ignore[arg-type]
        watchdog,  # type: ignore[arg-type]
        None,
    )
    return opening, outgoing


def _answered() -> Connection:
    return _Recorded(status=200, reason="OK", fields=[], content_type="text/plain")  # type: ignore[return-value]


def test_a_head_that_comes_while_the_handler_is_being_cut_is_left_to_it() -> None:
    """A deadline or the client's leaving cancels the handler: a head arriving before it
    runs again begins nothing (the handler answers the cut as it always did)."""
    opening, outgoing = _opening(cutting=True, start=None)
    opening(_answered())
    assert (opening.forward, opening.error, outgoing.calls) == (None, None, [])


def test_what_beginning_the_response_raises_is_kept_for_the_handler() -> None:
    def start(*_: object) -> None:
        raise LookupError("a bug")

    opening, outgoing = _opening(cutting=False, start=start)
    opening(_answered())
    assert opening.forward is None
    assert isinstance(opening.error, LookupError)
    opening(_answered())  # the handler's own call, after: nothing more
    assert outgoing.calls == ["sent"]
