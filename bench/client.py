"""The load client: one raw asyncio ``Protocol`` per HTTP/1.1 stream, on uvloop.

It does the least a client can: write one request, parse the status line and the framing
headers, de-chunk the body, and hand the payload to a sink: :class:`EventSink` (pulls the
upstream's send stamps out of SSE events and records receive minus send) or a hash
(:mod:`hashlib`) for bulk bodies. One connection carries one request.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

_STAMP = re.compile(rb'"t":(\d+)')
MODEL_PATH = "/api/v3/wavespeed-ai/any-llm/stream"
BODY = b'{"prompt":"benchmark","stream":true}'


def request_bytes(port: int, query: str) -> bytes:
    return (
        f"POST {MODEL_PATH}?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
        "Authorization: Bearer client-token\r\n\r\n"
    ).encode() + BODY


class EventSink:
    """Collects one-way delays (ns) of SSE events; shared by many streams."""

    __slots__ = ("count", "delays", "first_ns", "last_ns")

    def __init__(self) -> None:
        self.delays: list[int] = []
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0


class Stream(asyncio.Protocol):
    """One request and its streamed response."""

    def __init__(
        self,
        request: bytes,
        *,
        events: EventSink | None = None,
        on_body: Callable[[memoryview], None] | None = None,
        on_first_event: Callable[[Stream], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.request = request
        self.events = events
        self.on_body = on_body
        self.on_first_event = on_first_event
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.body_bytes = 0
        self.n_events = 0
        self.first_body_ns = 0
        self.complete = False
        self._head = bytearray()
        self._in_body = False
        self._chunked = False
        self._length: int | None = None
        self._line = bytearray()
        self._left = 0  # bytes left in the current chunk (or the content-length body)
        self._crlf = 0
        self._tail = b""

    # --- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(self.request)
        if not self.connected.done():
            self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        """Reset the connection, the way a closed browser tab leaves."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- parsing ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(bytes(self._head[:end]))
            data = bytes(self._head[end + 4 :])
            self._head = bytearray()
            self._in_body = True
            if not data:
                return
        if self.first_body_ns == 0:
            self.first_body_ns = time.monotonic_ns()
        if self._chunked:
            self._dechunk(data)
        elif self._length is not None:
            take = min(self._left, len(data))
            self._payload(memoryview(data)[:take])
            self._left -= take
            if self._left == 0:
                self._finish()
        else:
            self._payload(memoryview(data))

    def eof_received(self) -> bool | None:
        if self._in_body and not self._chunked and self._length is None:
            self._finish()
        return None

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif name == b"content-length":
                self._length = self._left = int(value)
        if self._length == 0:
            self._finish()

    def _dechunk(self, data: bytes) -> None:
        view = memoryview(data)
        pos, n = 0, len(data)
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                self._payload(view[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._crlf = 2
            elif self._crlf:
                take = min(self._crlf, n - pos)
                pos += take
                self._crlf -= take
            else:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._line += data[pos:]
                    return
                self._line += data[pos:nl]
                pos = nl + 1
                size = int(bytes(self._line).split(b";", 1)[0].strip(), 16)
                self._line = bytearray()
                if size == 0:
                    self._finish()
                    return
                self._left = size

    def _payload(self, view: memoryview) -> None:
        self.body_bytes += len(view)
        if self.on_body is not None:
            self.on_body(view)
        sink = self.events
        if sink is not None:
            now = time.monotonic_ns()
            data = self._tail + bytes(view)
            end = data.rfind(b"\n\n")
            if end < 0:
                self._tail = data
                return
            self._tail = data[end + 2 :]
            stamps = _STAMP.findall(data, 0, end)
            if stamps:
                if sink.first_ns == 0:
                    sink.first_ns = now
                sink.last_ns = now
                delays = sink.delays
                for stamp in stamps:
                    delays.append(now - int(stamp))
                sink.count += len(stamps)
                first = self.n_events == 0
                self.n_events += len(stamps)
                if first and self.on_first_event is not None:
                    self.on_first_event(self)

    def _finish(self) -> None:
        self.complete = True
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def open_stream(port: int, request: bytes, **kwargs: object) -> Stream:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: Stream(request, **kwargs),  # type: ignore[arg-type]
        "127.0.0.1",
        port,
    )
    return proto


async def http_json(port: int, method: str, path: str) -> bytes:
    """A tiny control request to the fake upstream (stats, reset)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length)
    writer.close()
    return body
