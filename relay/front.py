"""The relay's own HTTP/1.1 server side: one :class:`Front` per client connection.

aiohttp serves the relay's own pages, health checks and (on a shared listener) metrics;
every other request, relayed or refused, is parsed here with llhttp (``httptools``) and
served by :func:`relay.app.handle` with no request or response object, router, middleware
or second task of aiohttp's in between. That is most of what a new request and an open
stream cost in Python (``python -m bench.floor`` measured it), so the front keeps it small:

- **Handing off.** When a request's head names a route of the app's own, the connection
  is handed to an aiohttp request handler with every byte of that request. aiohttp serves
  it and closes the connection (``relay.server.RelayRunner``), so a browser's next
  request, to a relayed path, arrives on a new connection at the front.
- **Framing is llhttp's.** Content-Length and chunked bodies are decoded by the parser,
  which refuses ambiguous framing (both headers, repeated lengths); the front refuses a
  coding besides ``chunked`` (``gzip, chunked``), which it would not undo. A request's body
  is read as the handler asks for it, with the socket paused past :data:`BODY_HIGH_WATER`;
  ``Expect: 100-continue`` is answered when the handler first reads; a chunked body's
  trailer fields are dropped (the body goes upstream with a length). A body that breaks its
  framing fails the handler's read with a 400; one that stops arriving for
  :data:`BODY_GAP_SECONDS`, with a 408 (a dead client would hold its stream slot). An
  upgrade offer (``Upgrade: h2c``, ``websocket``) is ignored, as HTTP allows: the request
  is served as HTTP/1.1, its body read by a parser of its own (llhttp would take it for the
  new protocol's bytes).
- **One request at a time.** Bytes that arrive while a request is being answered wait
  (reading pauses past :data:`PENDING_LIMIT`) and are parsed once it ends. A second request
  in the same read as the end of the first (pipelining) ends the connection after the
  first response instead, which HTTP allows and clients retry.
- **Ending.** A connection closes after a response the client asked to be the last, after
  one that left its request body unread, and after :data:`KEEPALIVE_SECONDS` without a
  request. The client leaving cancels its request's task, as aiohttp's
  ``handler_cancellation`` does. A stream cut by the upstream is aborted (a reset).
- **Lingering.** When the client may still be sending (a body the relay refused before
  reading it, a pipelined request), closing would make the client's kernel answer those
  bytes with a reset, which destroys the response before a client that reads only after
  sending (a browser, curl) sees it. So then, as nginx does, the relay shuts only its side
  and discards what arrives until the client closes, sends nothing for
  :data:`LINGER_GAP_SECONDS`, or :data:`LINGER_SECONDS` pass.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from http import HTTPStatus
from typing import Any, cast

import httptools
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from relay.errors import BadRequest, RequestTimeout
from relay.sweep import NEVER, Sweep, tick_for

logger = structlog.get_logger("relay.front")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together
BODY_HIGH_WATER = 256 * 1024  # request body bytes buffered before the socket is paused
BODY_GAP_SECONDS = 60.0  # the longest a body being read may pause (nginx's client_body_timeout)
PENDING_LIMIT = 64 * 1024  # bytes held for the next request while one is answered
KEEPALIVE_SECONDS = 75.0  # an idle connection's life between requests (nginx's default)
LINGER_SECONDS = 30.0  # the longest a closing connection discards what the client still sends
LINGER_GAP_SECONDS = 5.0  # ... or until it sends nothing for this long (nginx's figures)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BODYLESS = frozenset({204, 304})
_FRAMING = frozenset({"transfer-encoding", "connection"})  # the relay sets these itself

Handle = Callable[["Request"], Coroutine[Any, Any, None]]
Handoff = Callable[[str, str], bool]  # (method, path) -> served by aiohttp
Fields = list[tuple[str, str]]  # a head's fields in order, as they go out
Label = Callable[["Request"], Fields]  # fields every response carries (CORS)


class _HandOff(Exception):
    """Raised from the parser's callback to stop parsing: aiohttp takes this request."""


class _Pipelined(Exception):
    """Raised from the parser's callback: a second request began in the same read."""


class _Unframeable(Exception):
    """Raised from the parser's callback: a body coded in a way the relay does not undo."""


class FrontServer:
    """The listener's protocol factory: a :class:`Front` per connection, beside aiohttp's
    ``web.Server`` (which it wraps, for the connections handed to it)."""

    def __init__(
        self, aiohttp_server: web.Server, *, handle: Handle, handoff: Handoff, label: Label
    ) -> None:
        self.aiohttp = aiohttp_server
        self.handle = handle
        self.handoff = handoff
        self.label = label
        self.fronts: set[Front] = set()
        self.closing = False
        self.keepalive = Sweep(self.fronts, tick_for(KEEPALIVE_SECONDS))  # closes idle ones

    def __call__(self) -> Front:
        return Front(self)

    def pre_shutdown(self) -> None:
        """Close idle connections; busy ones close when their request ends."""
        self.closing = True
        self.keepalive.stop()
        self.aiohttp.pre_shutdown()
        for front in list(self.fronts):
            front.close_if_idle()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's
        """Wait up to ``timeout`` for requests in progress, then cancel what is left."""
        tasks = [f.task for f in self.fronts if f.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=timeout)
        for front in list(self.fronts):
            front.close()
        await self.aiohttp.shutdown(timeout)


class Front(asyncio.Protocol):
    """One client connection while the relay serves it (see the module's docstring)."""

    __slots__ = (
        "_body_framing", "_closing_after", "_drained", "_headers", "_heard", "_idle",
        "_linger_until", "_loop", "_parser", "_pending", "_raw", "_raw_size", "_url", "due",
        "peer", "request", "server", "task", "transport", "writing_paused",
    )  # fmt: skip

    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self._parser: httptools.HttpRequestParser | None = None
        self._raw: list[bytes] = []  # what the current request sent, until its head is read
        self._raw_size = 0
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self.request: Request | None = None  # the request being received or answered
        self.task: asyncio.Task[None] | None = None
        self._pending = bytearray()  # what arrived while a request was being answered
        self._closing_after = False  # the current response is the connection's last
        self.writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self.due = NEVER  # while a request is awaited: when the connection closes unused
        self._idle: asyncio.TimerHandle | None = None  # while lingering: the next look
        self._linger_until = 0.0  # set once the relay has shut its side (see _linger)
        self._heard = 0.0  # when the client last sent bytes while lingering
        self._body_framing = b""  # an upgrade offer's body: the head of a parser to read it

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # or uvloop's
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.server.fronts.add(self)
        self._await_request()

    def data_received(self, data: bytes) -> None:
        if self._linger_until:  # nobody will read it
            self._heard = self._loop.time()
            return
        request = self.request
        if request is not None and request.received:  # the next request, early: it waits
            self._pending += data
            if len(self._pending) > PENDING_LIMIT and self.transport is not None:
                self.transport.pause_reading()
            return
        self._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.fronts.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self.request is not None:
            self.request.lost()
        if self.task is not None:
            self.task.cancel()  # the client left: its request ends (handler cancellation)
        self._wake_writer(ConnectionResetError("the client went away"))
        self._parser = None

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer(None)

    async def drain(self) -> None:
        """Wait until the client's transport takes writes again; raises once it is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        if self.writing_paused:
            self._drained = self._loop.create_future()
            await self._drained

    # -- the connection's life ---------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close_if_idle(self) -> None:
        if self.request is None:
            self.close()

    def _await_request(self) -> None:
        self.due = self._loop.time() + KEEPALIVE_SECONDS
        self.server.keepalive.wake()

    def expired(self, now: float) -> None:
        """No request came for :data:`KEEPALIVE_SECONDS` (the server's sweep tells)."""
        self.due = NEVER
        self.close()

    def _last_request(self) -> None:
        """No request after this one: its response, if not begun, says so (Connection: close)."""
        self._closing_after = True
        if self.request is not None:
            self.request.last = True

    def _close_after_reading(self) -> None:
        """Close once the client stops sending: shut our side now, and discard what arrives
        (the module's docstring says why)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        self._parser = None
        self._pending.clear()
        self.due = NEVER  # the wait for a request head, when that head was refused
        self._heard = now = self._loop.time()
        self._linger_until = now + LINGER_SECONDS
        transport.write_eof()  # after what is still buffered: the client reads all of it
        transport.resume_reading()
        self._idle = self._loop.call_at(
            min(now + LINGER_GAP_SECONDS, self._linger_until), self._linger
        )

    def _linger(self) -> None:
        now = self._loop.time()
        if now >= self._linger_until or now - self._heard >= LINGER_GAP_SECONDS:
            self.close()
        else:
            wake = min(self._heard + LINGER_GAP_SECONDS, self._linger_until)
            self._idle = self._loop.call_at(wake, self._linger)

    def _wake_writer(self, exc: Exception | None) -> None:
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _feed(self, data: bytes) -> None:
        if self._parser is None:
            self._parser = httptools.HttpRequestParser(self)
        if self.request is None:  # still reading the head: keep it for a hand-off
            self._raw.append(data)
            self._raw_size += len(data)
        body = b""  # what follows an upgrade offer's head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HandOff):
                return self._hand_off()
            if isinstance(cause, _Pipelined):
                self._last_request()
                self._parser = None
                return None
            if isinstance(cause, _Unframeable):
                self._malformed(str(cause))
                return None
            raise
        except httptools.HttpParserUpgrade as upgrade:
            # An upgrade offer (``curl --http2`` makes one on plain http): the relay switches
            # to nothing and serves the request as HTTP/1.1. llhttp ended the message at its
            # head, so a body that follows is read by a parser of its own.
            self._last_request()
            self._parser = None
            if framing := self._body_framing:
                self._body_framing = b""
                self._parser = httptools.HttpRequestParser(_BodyOnly(self))
                self._parser.feed_data(framing)
                body = data[upgrade.args[0] :]
        except httptools.HttpParserError as exc:
            self._malformed(str(exc))
            return None
        if self.request is None and self._raw_size > MAX_HEAD_BYTES:
            self._malformed("the request head is too large")
        if body:  # fed here, not in the handler above: a callback's error chains as usual
            self._feed(body)
        return None

    def _malformed(self, why: str) -> None:
        self._parser = None
        request = self.request
        if request is not None:  # the body was malformed: its reader fails with a 400
            request.lost(BadRequest(f"malformed request body: {why}"))
            self._last_request()
            return
        request = Request(self, "GET", "/", (1, 1), [])
        request.last = True
        error = BadRequest(f"malformed request: {why}")
        request.reply(error.status, error.envelope(), error.headers().items())
        self._close_after_reading()

    def _hand_off(self) -> None:
        """Give this connection to aiohttp with every byte of the current request."""
        transport = self.transport
        assert transport is not None
        self.server.fronts.discard(self)
        raw, self._raw = b"".join(self._raw), []
        self._parser = None
        handler = self.server.aiohttp()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(raw)

    def _answered(self, task: asyncio.Task[None]) -> None:
        """The request's task ended: keep the connection for the next request, or close it."""
        self.task = None
        request, self.request = self.request, None
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("request_failed", exc_info=exc)  # a bug: handle() catches the rest
            self.close()
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if request is None or not request.received or self._closing_after:
            self._close_after_reading()  # the client may still be sending
            return
        if request.last or self.server.closing:
            if self._pending:  # it sent more, unasked for: it may still be sending
                self._close_after_reading()
            else:
                transport.close()
            return
        self._await_request()
        transport.resume_reading()  # paused for a large body, or for what waits here
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self._feed(data)

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.request is not None:
            raise _Pipelined

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.request is not None:
            return  # a chunked body's trailer field: forwarded nowhere, and not the next head's
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        method = parser.get_method().decode("ascii", "replace")
        target = self._url.decode("latin-1")
        if self.server.handoff(method, target.partition("?")[0]):
            raise _HandOff
        self.due = NEVER
        major, _, minor = parser.get_http_version().partition(".")
        request = Request(self, method, target, (int(major or 1), int(minor or 1)), self._headers)
        coding = request.headers.get("Transfer-Encoding")  # llhttp allows one, ending in chunked
        if coding is not None and coding.strip().lower() != "chunked":  # "gzip, chunked"
            # llhttp undoes only the chunking: the rest would go upstream as if it were the body
            raise _Unframeable("a transfer coding other than chunked")
        self.request = request
        request.last = not parser.should_keep_alive()
        if parser.should_upgrade():
            self._body_framing = _body_framing(request.headers)
        self._raw, self._raw_size, self._url, self._headers = [], 0, b"", []
        self.task = task = self._loop.create_task(self.server.handle(request))
        task.add_done_callback(self._answered)

    def on_body(self, body: bytes) -> None:
        assert self.request is not None
        if self.request.body_received(body) > BODY_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        assert self.request is not None
        if self._body_framing:
            return  # llhttp's end of an upgrade offer: its body is still to come
        self.request.body_complete()
        self._parser = None  # llhttp would carry on with the next message; ours is new


def _body_framing(headers: CIMultiDictProxy[str]) -> bytes:
    """A request head that frames a body as ``headers`` do (b"" for no body)."""
    if "Transfer-Encoding" in headers:  # llhttp let only a chunked coding through
        return b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    length = headers.get("Content-Length", "0")
    if length == "0":
        return b""
    return b"POST / HTTP/1.1\r\nContent-Length: %b\r\n\r\n" % length.encode()


class _BodyOnly:
    """The callbacks of a parser that reads one body after its framing head (see
    :func:`_body_framing`): its chunks go to the front's request, and a second message
    begun after it is a pipelined request, as on the front's own parser."""

    __slots__ = ("_begun", "on_body", "on_message_complete")

    def __init__(self, front: Front) -> None:
        self._begun = False
        self.on_body = front.on_body
        self.on_message_complete = front.on_message_complete

    def on_message_begin(self) -> None:
        if self._begun:
            raise _Pipelined
        self._begun = True


class Request:
    """One request on the front: its head, its body as it arrives, and its response.

    The attributes the relay reads (``method``, ``raw_path``, ``headers``, ``remote``,
    ``content_type``, ``content_length``) are named as aiohttp names them.
    """

    __slots__ = (
        "_body", "_body_size", "_continue", "_error", "_head", "_waiter", "chunked", "fields",
        "front", "headers", "last", "method", "raw_path", "received", "remote", "started",
        "transport", "version",
    )  # fmt: skip

    scheme = "http"

    def __init__(
        self,
        front: Front,
        method: str,
        target: str,
        version: tuple[int, int],
        fields: Fields,
    ) -> None:
        self.front = front  # the connection it came on
        self.transport = front.transport
        self.remote = front.peer
        self.method = method
        self.raw_path = target
        self.version = version
        self.fields = fields  # the head's fields as they came, for the upstream request
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(fields))
        self.last = False  # the response is this connection's last
        self.received = False  # the whole body arrived
        self.started = False  # the response head was written
        self.chunked = False
        self._head = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._continue = self.headers.get("Expect", "").lower() == "100-continue"

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")

    @property
    def content_type(self) -> str:
        raw = self.headers.get("Content-Type")
        if raw is None:
            return "application/octet-stream"
        return raw.partition(";")[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        return None if raw is None else int(raw)  # llhttp checked it is one number

    # -- the body ----------------------------------------------------------------------------

    def body_received(self, chunk: bytes) -> int:
        self._body.append(chunk)
        self._body_size += len(chunk)
        if self._waiter is not None:  # usually not: a small body comes with its head
            self._wake(None)
        return self._body_size

    def body_complete(self) -> None:
        self.received = True
        if self._waiter is not None:
            self._wake(None)

    def lost(self, exc: Exception | None = None) -> None:
        self._error = exc or ConnectionResetError("the client went away")
        self._wake(None)

    def _wake(self, _: None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arrived_body(self) -> bytes | None:
        """What is left of the body, at once, if all of it has arrived; else None."""
        if not self.received:
            return None
        body, self._body, self._body_size = b"".join(self._body), [], 0
        return body

    async def body(self) -> AsyncIterator[bytes]:
        """The request body's chunks as they arrive (llhttp has undone any chunked coding)."""
        if self._continue and not self.received and self.transport is not None:
            self._continue = False
            self.transport.write(CONTINUE)
        while True:
            if self._body:
                chunk = self._body.pop(0)  # a few chunks at most: the socket pauses
                self._body_size -= len(chunk)
                if not self.received and self._body_size <= BODY_HIGH_WATER:
                    self.front.resume_reading()
                yield chunk
            elif self.received:
                return
            elif self._error is not None:
                raise self._error
            else:
                loop = asyncio.get_running_loop()
                self._waiter = loop.create_future()
                stalled = loop.call_later(BODY_GAP_SECONDS, self._stalled)
                try:
                    await self._waiter
                finally:
                    stalled.cancel()

    def _stalled(self) -> None:
        if not self._body:  # bytes that came in the same turn of the loop are not a stall
            self.lost(RequestTimeout(f"no request body bytes for {BODY_GAP_SECONDS:g} s"))

    # -- the response ------------------------------------------------------------------------

    def start(self, status: int, reason: str, fields: Fields) -> None:
        """Begin the response with ``fields`` (whose framing and ``Connection`` fields are
        the relay's to set, and dropped). Without a Content-Length the body is chunked (or,
        for an HTTP/1.0 client, ends with the connection).

        The head waits in :meth:`take_head` for whoever writes next, so that it leaves
        with the body's first bytes in one write: one segment, and one wake-up of the
        client, fewer. Whoever starts a response writes the head before waiting on
        anything (:meth:`finish`, :meth:`reply` and the forwarder do).
        """
        self.started = True
        interim_or_empty = status in _BODYLESS or status < 200
        bodyless = interim_or_empty or self.method == "HEAD"
        out: Fields = []
        length: str | None = None
        typed = dated = False
        for name, value in fields:
            lower = name.lower()
            if lower == "content-length":
                if interim_or_empty:
                    continue  # RFC 9110 8.6: never on these
                if length is None:
                    length = value
            elif lower in _FRAMING:
                continue
            elif lower == "content-type":
                typed = True
            elif lower == "date":
                dated = True
            out.append((name, value))
        if length is not None or bodyless:
            self.chunked = False
        elif self.version >= (1, 1):
            self.chunked = True
            out.append(("Transfer-Encoding", "chunked"))
        else:
            self.last = True
        if not bodyless and length != "0" and not typed:
            out.append(("Content-Type", "application/octet-stream"))
        if not self.received:  # what is left of the body is never read
            self.last = True
        out += self.front.server.label(self)
        # Read by nobody from here on, and a stream may last hours.
        self.headers, self.fields = _NO_HEADERS, []
        if self.last:
            out.append(("Connection", "close"))
        elif self.version < (1, 1):
            out.append(("Connection", "keep-alive"))
        if not dated:
            out.append(("Date", http_date()))
        head = [f"HTTP/{self.version[0]}.{self.version[1]} {status} {reason}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in out]
        head.append("\r\n")
        self._head = "".join(head).encode("utf-8", "surrogateescape")

    def take_head(self) -> bytes:
        """The response head, if it was not written yet (then the caller writes it)."""
        head, self._head = self._head, b""
        return head

    def reply(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        """A whole response at once (the relay's own answers)."""
        out = [(name, value) for name, value in headers if name.lower() != "content-length"]
        out.append(("Content-Length", str(len(body))))
        self.start(status, HTTPStatus(status).phrase, out)
        self._write(self.take_head() + (b"" if self.method == "HEAD" else body))

    def finish(self) -> None:
        """End a streamed body cleanly (the terminating chunk)."""
        self._write(self.take_head() + (b"0\r\n\r\n" if self.chunked else b""))

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        """End the response so the client sees an error, never a clean end."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def client_gone(self) -> bool:
        return self.transport is None or self.transport.is_closing()


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The ``Date`` header's value, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]
