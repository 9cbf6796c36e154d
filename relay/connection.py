"""One upstream HTTP/1.1 connection that hands each response body chunk to a sink.

A general HTTP client hands a response body to the reading task through a buffer: the socket
callback appends to it and wakes a future, and a later turn of the loop copies it out
(aiohttp's ``StreamReader``). A relay has nowhere better to put a chunk than the client's
socket, so :class:`Connection` parses the response with llhttp (``httptools``) inside
``data_received`` and calls the attached sink with each body chunk right there: one callback
per chunk, no buffer, no task switch. Backpressure is explicit: a sink that fills the
client's transport calls :meth:`Connection.pause`, which stops reading the upstream socket
and wakes the handler to wait for the client to drain, then :meth:`Connection.resume`.

The pool of these, and the request head, are :mod:`relay.upstream`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import IO, Protocol, TypeVar, cast

import httptools

from relay.speedups import Switch

Sink = Callable[[bytes], None]
T = TypeVar("T")
Origin = tuple[str, str, int]  # scheme, host, port

HOLD_BYTES = 2**16  # body held while no sink is attached; past it the upstream socket pauses
MAX_HEAD_BYTES = 2**16  # a response head larger than this is refused
UPLOAD_CHUNK = 2**16  # a spooled upload is sent in pieces of this size


class Pool(Protocol):
    def put(self, connection: Connection) -> None: ...
    def discard(self, connection: Connection) -> None: ...


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection before its response was complete."""


class UpstreamProtocolError(ConnectionError):
    """The upstream's response is not valid HTTP/1.1."""


class Connection(asyncio.Protocol):
    """One upstream TCP (or TLS) connection and the exchange in flight on it, if any.

    The handler sends a request (:meth:`send`), waits for the response head (:meth:`head`),
    attaches a sink (:meth:`attach`) and then waits in :meth:`wait` for the three things it
    must act on: the client needs draining, the response is complete, or it failed.
    Afterwards :meth:`release` pools the connection if it can carry another exchange, and
    :meth:`close` ends it (the provider sees the disconnect and stops generating).
    """

    __slots__ = (
        "_complete", "_error", "_field_bytes", "_head_bytes", "_held", "_held_bytes", "_interrupt",
        "_keep_alive", "_loop", "_needs_drain", "_parser", "_pool", "_raw_headers", "_reason",
        "_sink", "_skipping_informational", "_transport", "_waiter", "_write_waiter",
        "data_received", "fields", "has_head", "idle_since", "on_body", "on_head", "origin",
        "pooled", "received_any", "status",
    )  # fmt: skip

    data_received: Switch  # type: ignore[assignment]  # asyncio's method, as a switch: see __init__

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # llhttp's body callback, looked up once by the parser: it reaches the attached sink
        # directly (in C where built), or holds the chunk while none is (see _reset).
        self.on_body = Switch(self._hold)
        self._parser = httptools.HttpResponseParser(self)
        # uvloop looks up data_received once, when the transport is made: it is a switch,
        # pointed straight at llhttp while a response body streams in (see _streaming), and
        # at _data_received, which checks what arrives, otherwise.
        self.data_received = Switch(self._data_received)
        self._waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0
        self.pooled = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.fields: list[tuple[str, str]] = []  # the response's header fields, in order
        self.has_head = False
        self.received_any = False
        self._reason = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._head_bytes = 0  # received while the head is unfinished
        self._field_bytes = 0  # the head's status reason and header fields
        self._skipping_informational = False
        self._complete = False
        self._keep_alive = False
        self._needs_drain = False
        self._error: BaseException | None = None
        self._interrupt: BaseException | None = None
        self._sink: Sink | None = None
        # Called with this connection once the response head is parsed, before any of its
        # body (relay.proxy begins the client's response there); it must not raise.
        self.on_head: Callable[[Connection], None] | None = None
        self.on_body.target = self._hold
        self._checking()
        self._held: list[bytes] = []
        self._held_bytes = 0

    # -- the handler's side ----------------------------------------------------------------

    @property
    def reason(self) -> str:
        return self._reason.decode("latin-1")

    @property
    def content_type(self) -> str:
        """The media type of the response, lower case, without parameters."""
        return _field(self.fields, "content-type", "").partition(";")[0].strip().lower()

    async def send(self, head: bytes, body: bytes | IO[bytes]) -> None:
        """Write one request: ``head`` and the body, waiting whenever the socket is full."""
        transport = self._live_transport()
        if isinstance(body, bytes):
            transport.write(head + body)  # one write: one packet for the usual JSON body
            return
        transport.write(head)
        while piece := body.read(UPLOAD_CHUNK):
            self._live_transport().write(piece)
            if self._write_waiter is not None:
                await self._write_waiter

    async def head(self) -> None:
        """Wait for the response's status line and headers."""
        while not self.has_head:
            if self._error is not None:
                raise self._error
            await self._next()

    def attach(self, sink: Sink) -> None:
        """From now on, call ``sink`` with each body chunk; first with any held ones.

        What an earlier sink passed to :meth:`interrupt` and nobody raised yet is dropped.
        """
        self._sink = self.on_body.target = sink
        self._interrupt = None
        held, self._held, self._held_bytes = self._held, [], 0
        for chunk in held:
            if self._sink is not sink:  # the sink refused one: the rest stays held
                self._held.append(chunk)
                self._held_bytes += len(chunk)
            else:
                sink(chunk)
        if not self._needs_drain and self._transport is not None:
            self._transport.resume_reading()

    async def wait(self) -> bool:
        """Wait until the client must be drained (False) or the response is complete (True).

        Raises the failure of the response, or what a sink passed to :meth:`interrupt`.
        """
        while True:
            if self._interrupt is not None:
                interrupt, self._interrupt = self._interrupt, None
                raise interrupt
            if self._needs_drain:
                return False
            if self._complete:
                return True
            if self._error is not None:
                raise self._error
            await self._next()

    def pause(self) -> None:
        """The sink's client is full: stop reading the upstream until :meth:`resume`."""
        if not self._needs_drain:
            self._needs_drain = True
            if self._transport is not None:
                self._transport.pause_reading()
            self._wake()

    def resume(self) -> None:
        self._needs_drain = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    @property
    def needs_drain(self) -> bool:
        return self._needs_drain

    def interrupt(self, exc: BaseException) -> None:
        """Make the handler's :meth:`wait` raise ``exc`` (once)."""
        self._interrupt = exc
        self._wake()

    def refuse(self, chunk: bytes, exc: BaseException) -> None:
        """The sink cannot take ``chunk``: detach it, hold the chunk, and interrupt."""
        self._sink = None
        self.on_body.target = self._hold
        self._hold(chunk)
        self.interrupt(exc)

    def release(self) -> None:
        """The exchange is over: pool the connection if it can carry another, else close it."""
        if self._complete and self._keep_alive and self._transport is not None:
            self._reset()
            self._pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        """End the connection, and let go of what the exchange referenced (the sink, and an
        error whose traceback holds the handler's frames), so that a stream's objects are
        freed by reference counting rather than left as cycles for the collector."""
        self._keep_alive = False
        self._sink = self.on_head = None
        self.on_body.target = _closed
        self._deaf()
        self._held.clear()
        self._error = self._interrupt = None
        if self._transport is not None:
            self._transport.close()

    @property
    def usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def _live_transport(self) -> asyncio.Transport:
        if self._transport is None or self._transport.is_closing():
            raise self._error or UpstreamClosed("the upstream connection is closed")
        return self._transport

    async def _next(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._deaf()
        if self._error is None:
            self._error = exc
        self._keep_alive = False
        self._wake()
        if self._transport is not None:
            self._transport.close()

    def _hold(self, chunk: bytes) -> None:
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if self._held_bytes > HOLD_BYTES and self._transport is not None:
            self._transport.pause_reading()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def _streaming(self) -> None:
        """A response body streams in: bytes go straight to llhttp, whose errors alone need
        handling (each check of :meth:`_data_received` holds until :meth:`_checking`)."""
        self.data_received.target = self._parser.feed_data
        self.data_received.on_error = self._feed_failed

    def _checking(self) -> None:
        """Whatever arrives from now on is checked first (:meth:`_data_received`)."""
        self.data_received.target = self._data_received
        self.data_received.on_error = None

    def _deaf(self) -> None:
        """The connection is closing: what may still arrive is dropped (and the switch lets
        go of this connection's methods, a cycle)."""
        self.data_received.target = _closed
        self.data_received.on_error = None

    def _data_received(self, data: bytes) -> None:
        self.received_any = True
        if self.pooled or self._complete or self._error is not None:  # bytes nobody asked for
            self._fail(UpstreamProtocolError("unexpected bytes from the upstream"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._feed_failed(exc)
            return
        # An unfinished head is bounded here, by what arrived while it was unfinished (llhttp
        # holds a header it has not finished); a whole one in on_headers_complete. Bytes of
        # the body that come in the head's read never count: a fast upstream's first read
        # may well be the head and a few hundred kilobytes of body.
        if not self.has_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamProtocolError("response head too large"))

    def _feed_failed(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserCallbackError):  # ours, or a sink's (a bug)
            self._fail(exc.__context__ or exc)
        elif isinstance(exc, httptools.HttpParserError):
            self._fail(UpstreamProtocolError(f"invalid response ({type(exc).__name__})"))
        else:
            raise exc

    def eof_received(self) -> bool:
        return False  # close: a half-closed upstream carries no more exchanges

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pool.discard(self)
        if self._ends_body(exc):
            self._complete = True  # a body without framing ends where the connection does
        elif not self._complete:
            self._error = self._error or UpstreamClosed("the upstream closed the connection")
        self._keep_alive = False
        self._sink = None
        self.on_body.target = _closed
        self._deaf()
        del self._parser  # it holds our bound methods (a cycle), and nothing more arrives
        self._wake()
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)  # the next write raises

    def pause_writing(self) -> None:
        self._write_waiter = self._loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _ends_body(self, exc: Exception | None) -> bool:
        """Whether a clean close completes the response: its body is delimited by the close."""
        return (
            self.has_head
            and not self._complete
            and exc is None
            and self._error is None
            and _field(self.fields, "content-length", None) is None
            and "chunked" not in _field(self.fields, "transfer-encoding", "").lower()
        )

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second response to one request: never let it answer the next
            raise UpstreamProtocolError("bytes after the response")

    def on_status(self, status: bytes) -> None:
        self._reason += status
        self._field_bytes += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_bytes += len(name) + len(value)
        self._raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self._field_bytes > MAX_HEAD_BYTES:
            raise UpstreamProtocolError("response head too large")
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: an interim response, the real one follows
            self._skipping_informational = True
            self._raw_headers, self._reason, self._field_bytes = [], b"", 0
            return
        self.status = status
        self.fields, self._raw_headers = self._raw_headers, []
        self.has_head = True
        self._streaming()
        on_head, self.on_head = self.on_head, None
        if on_head is not None:
            on_head(self)  # may attach a sink: then this read's body goes straight to it
        self._wake()

    def on_message_complete(self) -> None:
        if self._skipping_informational:
            self._skipping_informational = False
            return
        self._complete = True
        self._checking()
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()


def _closed(_: bytes) -> None:
    """The body callback of a closed connection: nothing more is read from it."""


def _field(fields: list[tuple[str, str]], lower: str, default: T) -> str | T:
    """The value of the first field named ``lower`` (any case), else ``default``."""
    for name, value in fields:
        if name.lower() == lower:
            return value
    return default
