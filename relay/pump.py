"""The only place bytes move from the upstream to the client.

One loop: read what the upstream has delivered, write it, then read again. No queue, no
accumulation, nothing read ahead. The write is the backpressure: once the client's transport
is full, :class:`ClientSink` waits until it drains, so the upstream is not read either, and
aiohttp's client reader pauses the upstream socket once its own small buffer is full.

:class:`Watchdog` enforces the relay's deadlines (first byte, idle gap, maximum duration,
and the shutdown cut) with one timer per period rather than one per chunk: the pump only
stores the time of its last progress, and the timer re-arms itself from that when it fires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import ClientConnectionResetError, StreamReader, web

from relay.exchange import (
    IDLE_TIMEOUT,
    MAX_DURATION,
    TTFB_TIMEOUT,
    Exchange,
)
from relay.metrics import StreamMeters
from relay.sse import SseTap

ChunkTap = Callable[[bytes], None]


class Watchdog:
    """Cancels one task when a deadline passes, and remembers which.

    Before :meth:`streaming` it waits for the upstream's response headers under the
    first-byte deadline; after, for each chunk under the idle deadline. The maximum
    duration holds throughout, and :meth:`expire` cuts at once (used for shutdown).
    """

    # Times are time.monotonic() seconds; loop.time() reads the same monotonic clock on
    # asyncio's loop and on uvloop (at millisecond resolution), so the two compare directly.
    __slots__ = ("_deadline", "_handle", "_idle", "_loop", "_task", "expired", "last")

    def __init__(
        self, *, started: float, first_byte: float, idle: float, max_duration: float
    ) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a Watchdog guards the task that creates it"
        self._task = task
        self._idle = idle
        self._deadline = started + max_duration
        self.expired: str | None = None
        self.last = started
        self._handle = self._loop.call_at(min(started + first_byte, self._deadline), self._ttfb)

    def streaming(self, now: float) -> None:
        """The upstream answered: from now on, guard the gaps between chunks."""
        self.last = now
        self._handle.cancel()
        self._handle = self._loop.call_at(min(now + self._idle, self._deadline), self._check)

    def expire(self, outcome: str) -> None:
        """Cut the guarded task now, recording why (the first reason wins)."""
        self._handle.cancel()
        if self.expired is None:
            self.expired = outcome
            self._task.cancel()

    def stop(self) -> None:
        self._handle.cancel()

    def claim(self) -> str | None:
        """After a ``CancelledError``: our outcome if we caused it and nothing else did."""
        if self.expired is not None and self._task.uncancel() == 0:
            return self.expired
        return None

    def _ttfb(self) -> None:
        self.expire(MAX_DURATION if self._loop.time() >= self._deadline else TTFB_TIMEOUT)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self._deadline:
            self.expire(MAX_DURATION)
        elif now - self.last >= self._idle:
            self.expire(IDLE_TIMEOUT)
        else:
            self._handle = self._loop.call_at(
                min(self.last + self._idle, self._deadline), self._check
            )


class ClientSink:
    """Writes body chunks straight to the client's transport: the backpressure, in one class.

    After ``prepare()`` aiohttp's own ``write`` adds three Python layers per chunk (each
    checking for compression and clipping the relay never uses). This sink frames a chunk
    as aiohttp's writer would (HTTP/1.1 chunked, or raw under a Content-Length, which the
    upstream's framing already bounds) and waits only while the transport is paused, which
    is exactly when aiohttp's writer would wait. ``write_eof`` stays aiohttp's.
    """

    __slots__ = ("_chunked", "_protocol", "_transport", "_writer")

    SMALL = 4096  # below this a chunk is framed into one buffer; above, written as three

    def __init__(self, request: web.BaseRequest) -> None:
        transport, protocol = request.transport, request.protocol
        if transport is None or protocol is None:
            raise ClientConnectionResetError("the client went away")
        self._transport = transport
        self._protocol = protocol
        self._writer = request.writer
        self._chunked = getattr(request.writer, "chunked", False)

    async def write(self, chunk: bytes) -> None:
        transport = self._transport
        if transport.is_closing():
            raise ClientConnectionResetError("the client went away")
        if not self._chunked:
            transport.write(chunk)
        elif len(chunk) < self.SMALL:
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        if self._protocol.writing_paused:
            await self._writer.drain()


async def pump(
    source: StreamReader,
    sink: ClientSink,
    exchange: Exchange,
    meters: StreamMeters,
    watchdog: Watchdog,
    tap: ChunkTap | None = None,
    heartbeat: float | None = None,
    events: SseTap | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Copy ``source`` to ``sink`` chunk by chunk until the upstream's clean end.

    With ``heartbeat`` (event streams only) an SSE comment is written whenever the upstream
    has been silent that long and the stream stands at an event boundary.
    Raises whatever the read or the write raises; the caller classifies it.
    """
    write, record = sink.write, meters.chunk
    read: Callable[[], Awaitable[bytes]] = source.readany
    if heartbeat is not None and events is not None:
        read = _with_heartbeat(source, sink, exchange, heartbeat, events)
    read_buffered = source.read_nowait
    while chunk := read_buffered(-1) or await read():
        received = clock()
        await write(chunk)
        written = clock()
        watchdog.last = written  # idle time counts only while we wait on the upstream
        if tap is not None:
            tap(chunk)  # after the write: a passive look never delays the client
        exchange.bytes_out += len(chunk)
        exchange.chunks += 1
        record(received, written)


HEARTBEAT = b": keep-alive\n\n"


def _with_heartbeat(
    source: StreamReader,
    sink: ClientSink,
    exchange: Exchange,
    every: float,
    events: SseTap,
) -> Callable[[], Awaitable[bytes]]:
    async def read() -> bytes:
        while True:
            try:
                return await asyncio.wait_for(source.readany(), every)
            except TimeoutError:  # nothing lost: the bytes stay in the reader's buffer
                if events.at_boundary:
                    await sink.write(HEARTBEAT)
                    exchange.heartbeats += 1

    return read


async def drain(source: StreamReader, exchange: Exchange, watchdog: Watchdog, limit: int) -> bool:
    """Read the upstream to its end with nobody to write to; False past ``limit`` bytes."""
    read, clock = source.readany, time.monotonic
    total = exchange.drained_bytes or 0  # a drain may resume after an absorbed cancellation
    while chunk := await read():
        watchdog.last = clock()
        total += len(chunk)
        exchange.drained_bytes = total
        if total > limit:
            return False
    return True
