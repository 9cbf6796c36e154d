"""The only place bytes move from the upstream to the client.

One loop, one ``await`` for the read and one for the write per chunk: no queue, no
accumulation, nothing read ahead. The awaited write is the backpressure: while the client
does not read, the write does not return, so the upstream is not read either, and aiohttp's
client reader pauses the upstream socket once its own small buffer is full.

:class:`Watchdog` enforces the relay's deadlines (first byte, idle gap, maximum duration,
and the shutdown cut) with one timer per period rather than one per chunk: the pump only
stores the time of its last progress, and the timer re-arms itself from that when it fires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import StreamReader, web

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


async def pump(
    source: StreamReader,
    sink: web.StreamResponse,
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
    write = sink.write
    read: Callable[[], Awaitable[bytes]] = source.readany
    if heartbeat is not None and events is not None:
        read = _with_heartbeat(source, sink, exchange, heartbeat, events)
    observe_gap, observe_forward = meters.gap.observe, meters.forward.observe
    inc_bytes, inc_chunks = meters.bytes_out.inc, meters.chunks.inc
    previous = 0.0
    while chunk := await read():
        received = clock()
        await write(chunk)
        written = clock()
        watchdog.last = written  # idle time counts only while we wait on the upstream
        if tap is not None:
            tap(chunk)  # after the write: a passive look never delays the client
        size = len(chunk)
        exchange.bytes_out += size
        exchange.chunks += 1
        if exchange.first_byte_at is None:
            exchange.first_byte_at = written
            meters.ttfb.observe(written - exchange.started)
        else:
            observe_gap(received - previous)
        previous = received
        observe_forward(written - received)
        inc_bytes(size)
        inc_chunks()


HEARTBEAT = b": keep-alive\n\n"


def _with_heartbeat(
    source: StreamReader,
    sink: web.StreamResponse,
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
