"""The fake upstream: a minimal HTTP/1.1 server on a raw asyncio ``Protocol`` and uvloop.

It must cost the rig as little as possible, so it parses only what the benchmark sends and
answers from the query string of ``POST /api/v3/{model}/stream``:

- ``mode=sse&n=N&rate=R&pad=P``: N SSE events (``n=0``: until the client goes), R per
  second, the first at once with the headers; each carries ``"t":`` the
  ``time.monotonic_ns()`` taken just before its write, so the client can compute the
  one-way delay. ``hold=1`` keeps the response open after the N events (idle streams).
- ``mode=bulk&bytes=B``: B bytes of a fixed pseudo-random pattern (:func:`bulk_block`),
  written as fast as the socket takes them, honouring ``pause_writing``.
- ``id=X``: the time the connection carrying request X closes is remembered, for the
  disconnect-propagation figure of W7.

All responses use chunked transfer encoding, like a streaming provider. Connections are
kept alive, so a relay's upstream pool is exercised. ``GET /_bench/stats`` (JSON) reports
open streams and close times; ``POST /_bench/reset`` clears them.

Run as ``python -m bench.upstream --port 0``: it prints ``{"port": N}`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from urllib.parse import parse_qsl

BLOCK_BYTES = 1 << 20
BULK_SEED = 20_240_229
WRITE_CHUNK = 1 << 16
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_BULK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
_LAST = b"0\r\n\r\n"


def bulk_block() -> bytes:
    """The 1 MiB pattern bulk bodies repeat (the client hashes what it should receive)."""
    return random.Random(BULK_SEED).randbytes(BLOCK_BYTES)


class Stats:
    def __init__(self) -> None:
        self.open_streams = 0
        self.closed: dict[str, int] = {}
        self.requests = 0


class _Stream:
    """The response in progress on a connection: its query's settings, and how far an SSE
    response has gone."""

    __slots__ = ("events", "gap", "hold", "id", "next_at", "pad", "sent")

    def __init__(self, params: dict[str, str], now: float) -> None:
        self.id = params.get("id")
        self.events = int(params.get("n", "1"))  # 0: until the client goes
        self.hold = params.get("hold") == "1"
        self.pad = b"x" * int(params.get("pad", "40"))
        rate = float(params.get("rate", "0"))
        self.gap = 1.0 / rate if rate > 0 else 0.0
        self.next_at = now  # when the event last written was due
        self.sent = 0


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "_block",
        "_buf",
        "_handle",
        "_loop",
        "_paused",
        "_pending",
        "_stats",
        "_stream",
        "_transport",
    )

    def __init__(self, stats: Stats, block: memoryview) -> None:
        self._stats = stats
        self._block = block
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._stream: _Stream | None = None
        self._paused = False
        self._pending: tuple[int, int] | None = None  # bulk: (offset, remaining)

    # --- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._end_stream(closed=True)
        self._transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._pending is not None:
            self._bulk_pump()

    # --- requests -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._stream is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self._buf) < end + 4 + length:
                return
            del self._buf[: end + 4 + length]
            method, target, _ = lines[0].split(" ", 2)
            self._dispatch(method, target)

    def _dispatch(self, method: str, target: str) -> None:
        path, _, query = target.partition("?")
        params = dict(parse_qsl(query))
        transport = self._transport
        assert transport is not None
        if path == "/_bench/stats":
            body = json.dumps(
                {
                    "open_streams": self._stats.open_streams,
                    "requests": self._stats.requests,
                    "closed": self._stats.closed,
                }
            ).encode()
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        if path == "/_bench/reset":
            self._stats.closed.clear()
            self._stats.requests = 0
            transport.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            return
        if method != "POST" or not path.startswith("/api/v3/"):
            transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        self._stats.requests += 1
        self._stats.open_streams += 1
        self._stream = _Stream(params, self._loop.time())
        if params.get("mode") == "bulk":
            transport.write(_BULK_HEAD)
            self._pending = (0, int(params["bytes"]))
            self._bulk_pump()
        else:
            self._sse_tick(head=_SSE_HEAD)

    # --- SSE ----------------------------------------------------------------------------
    def _sse_tick(self, head: bytes = b"") -> None:
        self._handle = None
        stream, transport = self._stream, self._transport
        if stream is None or transport is None:
            return
        event = b'data: {"i":%d,"t":%d,"delta":"%s"}\n\n' % (
            stream.sent,
            time.monotonic_ns(),
            stream.pad,
        )
        stream.sent += 1
        frame = b"%s%x\r\n%s\r\n" % (head, len(event), event)
        if stream.events and stream.sent >= stream.events:
            if stream.hold:
                transport.write(frame)
                return
            transport.write(frame + _LAST)
            self._end_stream(closed=False)
            return
        transport.write(frame)
        if stream.gap:
            stream.next_at += stream.gap
            self._handle = self._loop.call_at(stream.next_at, self._sse_tick)

    # --- bulk ---------------------------------------------------------------------------
    def _bulk_pump(self) -> None:
        transport = self._transport
        if transport is None or self._pending is None:
            return
        offset, remaining = self._pending
        block = self._block
        while remaining and not self._paused:
            size = min(WRITE_CHUNK, remaining, BLOCK_BYTES - offset)
            transport.write(b"%x\r\n" % size)
            transport.write(block[offset : offset + size])
            transport.write(b"\r\n")
            remaining -= size
            offset = (offset + size) % BLOCK_BYTES
        if remaining:
            self._pending = (offset, remaining)
            return
        self._pending = None
        transport.write(_LAST)
        self._end_stream(closed=False)

    def _end_stream(self, *, closed: bool) -> None:
        stream = self._stream
        if stream is None:
            return
        self._stream = None
        self._pending = None
        self._stats.open_streams -= 1
        if closed and stream.id is not None:
            self._stats.closed[stream.id] = time.monotonic_ns()


async def serve(port: int, ready: asyncio.Future[int] | None = None) -> None:
    stats = Stats()
    block = memoryview(bulk_block())
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(stats, block), "127.0.0.1", port, backlog=4096
    )
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": bound}), flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="the benchmark's fake upstream")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    try:
        uvloop.run(serve(args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
