"""The only place bytes move from the upstream to the client.

No loop and no queue: the upstream connection (:mod:`relay.connection`) calls a
:class:`Forwarder`'s sink with each body chunk from inside its socket callback, and the sink
writes the chunk to the client's transport before it returns. Nothing is read ahead: the
write is the backpressure. Once the client's transport is full, the forwarder pauses the
upstream socket, and :func:`pump`, the handler's side, waits for the client to drain before
it resumes reading. So a chunk crosses the relay in one callback, with no task switch and
no copy beyond the chunked framing.

:class:`Watchdog` enforces the relay's deadlines (first byte, idle gap, maximum duration,
and the shutdown cut) with no timer of its own: the forwarder only stores the time of its
last progress, and the app's sweep (:mod:`relay.sweep`, one timer for every stream) checks
it when its deadline comes. :class:`Heartbeat` keeps quiet event streams alive with one
timer per period, re-armed from the last write when it fires.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.connection import Connection
from relay.exchange import (
    IDLE_TIMEOUT,
    MAX_DURATION,
    TTFB_TIMEOUT,
    Exchange,
)
from relay.metrics import StreamMeters
from relay.speedups import COMPILED, Forward, frame
from relay.sse import SseTap
from relay.sweep import NEVER

if TYPE_CHECKING:
    from relay.front import Request

ChunkTap = Callable[[bytes], None]

# CPython 3.12.0 to 3.12.8 and 3.13.0 to 3.13.1: asyncio's own socket transport never pauses
# its protocol from ``writelines`` (CVE-2024-12254, gh-127655), so a client that stops
# reading would make the relay buffer without bound. uvloop's transports are not affected.
_WRITELINES_FIXED_IN = {(3, 12): (3, 12, 9), (3, 13): (3, 13, 2)}
_WRITELINES_UNSAFE = sys.version_info < _WRITELINES_FIXED_IN.get(sys.version_info[:2], (0,))


class Watchdog:
    """Cancels one task when a deadline passes, and remembers which.

    Before :meth:`streaming` it waits for the upstream's response headers under the
    first-byte deadline; after, for each chunk under the idle deadline. The maximum
    duration holds throughout, and :meth:`expire` cuts at once (used for shutdown). The
    app's :class:`~relay.sweep.Sweep` calls :meth:`expired` once :attr:`due` has passed.
    """

    # Times are time.monotonic() seconds; loop.time() reads the same monotonic clock on
    # asyncio's loop and on uvloop (at millisecond resolution), so the two compare directly.
    __slots__ = ("_deadline", "_idle", "_streaming", "_task", "due", "expired_as", "last")

    def __init__(
        self, *, started: float, first_byte: float, idle: float, max_duration: float
    ) -> None:
        task = asyncio.current_task()
        assert task is not None, "a Watchdog guards the task that creates it"
        self._task = task
        self._idle = idle
        self._deadline = started + max_duration
        self._streaming = False
        self.expired_as: str | None = None
        self.last = started
        self.due = min(started + first_byte, self._deadline)

    def streaming(self, now: float) -> None:
        """The upstream answered: from now on, guard the gaps between chunks."""
        self.last = now
        self._streaming = True
        self.due = min(now + self._idle, self._deadline)

    def expire(self, outcome: str) -> None:
        """Cut the guarded task now, recording why (the first reason wins)."""
        self.due = NEVER
        if self.expired_as is None:
            self.expired_as = outcome
            self._task.cancel()

    def stop(self) -> None:
        self.due = NEVER

    @property
    def cutting(self) -> bool:
        """The guarded task is being cancelled (by this watchdog, or anyone)."""
        return self._task.cancelling() > 0

    def claim(self) -> str | None:
        """After a ``CancelledError``: our outcome if we caused it and nothing else did."""
        if self.expired_as is not None and self._task.uncancel() == 0:
            return self.expired_as
        return None

    def expired(self, now: float) -> None:
        """The sweep found :attr:`due` passed: cut the task, or look again when it may be."""
        if now >= self._deadline:
            self.expire(MAX_DURATION)
        elif not self._streaming:
            self.expire(TTFB_TIMEOUT)
        elif now - self.last >= self._idle:
            self.expire(IDLE_TIMEOUT)
        else:  # a chunk came since: the gap is counted from it
            self.due = min(self.last + self._idle, self._deadline)


class ClientGone(ConnectionResetError):
    """The client's connection closed while the relay had a chunk for it."""


class DrainLimit(Exception):
    """A drain read more than its route allows; the upstream is closed instead."""


class Forwarder:
    """The sink of a streaming response: writes each body chunk straight to the client.

    Frames a chunk as the response head announced (HTTP/1.1 chunked, or raw under a
    Content-Length, which the upstream's framing already bounds), and pauses the upstream
    when the client's transport says it is full. Per chunk it then records two clock
    reads, the counters and the tap. The per-chunk call is :attr:`sink`, a
    :class:`~relay.speedups.Forward` (C where built); this class makes it and writes what
    is not a chunk (the head alone, a heartbeat).
    """

    __slots__ = ("sink",)

    SMALL = 4096  # below this a chunk is framed into one buffer; above, written as three

    def __init__(
        self,
        request: Request,
        upstream: Connection,
        exchange: Exchange,
        meters: StreamMeters,
        watchdog: Watchdog,
        tap: ChunkTap | None,
    ) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ClientGone("the client went away")
        # Where writelines would not pause the client's protocol, every chunk is framed
        # into one buffer (a copy of the chunk) and written with write(), which does.
        unsafe = _WRITELINES_UNSAFE and not type(transport).__module__.startswith("uvloop")
        self.sink = Forward(
            transport,
            request.front,
            upstream,
            exchange,
            meters.chunk,
            watchdog,
            tap,
            ClientGone,
            request.take_head(),  # written with the first chunk, or by flush()
            request.chunked,
            sys.maxsize if unsafe else self.SMALL,
        )

    def attach(self, upstream: Connection) -> None:
        """Become ``upstream``'s sink: the chunks that came with its head go out now, and
        the next ones as they arrive. A compiled sink is called by vectorcall; the Python
        twin through its bound method, the fastest way to call it."""
        upstream.attach(self.sink if COMPILED else self.sink.__call__)

    def flush(self) -> None:
        """Write the response head now if no chunk took it yet (before waiting for one)."""
        sink = self.sink
        if sink.head and not sink.transport.is_closing():
            head, sink.head = sink.head, b""
            sink.transport.write(head)

    def write(self, data: bytes) -> bool:
        """Frame and write ``data`` (not a body chunk: a heartbeat); False if the client is
        gone."""
        sink = self.sink
        transport = sink.transport
        if transport.is_closing():
            return False
        self.flush()
        if not sink.chunked:
            transport.write(data)
        elif len(data) < sink.small:
            transport.write(frame(data))
        else:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        if sink.protocol.writing_paused:
            sink.upstream.pause()
        return True


async def pump(upstream: Connection, forward: Forwarder, request: Request) -> None:
    """Relay the upstream's body through ``forward``, attached to ``upstream`` as its sink,
    until its clean end.

    The handler's task only waits here: for the response to complete, and for the client
    to drain whenever the forwarder found it full. Raises the upstream's failure, or
    :class:`ClientGone`; the caller classifies it.
    """
    forward.flush()  # the head, if no chunk came with it
    while not await upstream.wait():
        await request.front.drain()  # the client reads again (or is gone: this raises)
        upstream.resume()


HEARTBEAT = b": keep-alive\n\n"


class Heartbeat:
    """Writes an SSE comment whenever an event stream has been quiet ``every`` seconds.

    Only at an event boundary (never inside an event the upstream is still sending) and
    never while the client is full. One timer, re-armed from the last chunk or heartbeat.
    Heartbeats do not count as upstream progress, so they never hold off the idle deadline.
    """

    __slots__ = (
        "_events", "_every", "_exchange", "_forward", "_handle", "_loop", "_sent", "_upstream",
        "_watchdog",
    )  # fmt: skip

    def __init__(
        self,
        every: float,
        forward: Forwarder,
        upstream: Connection,
        events: SseTap,
        exchange: Exchange,
        watchdog: Watchdog,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._every = every
        self._forward = forward
        self._upstream = upstream
        self._events = events
        self._exchange = exchange
        self._watchdog = watchdog
        self._sent = self._loop.time()
        self._handle = self._loop.call_at(self._sent + every, self._beat)

    def stop(self) -> None:
        self._handle.cancel()

    def _beat(self) -> None:
        now = self._loop.time()
        quiet_since = max(self._watchdog.last, self._sent)
        if now - quiet_since >= self._every - CLOCK_SLACK:
            quiet = self._events.at_boundary and not self._upstream.needs_drain
            if quiet and self._forward.write(HEARTBEAT):
                self._exchange.heartbeats += 1
            self._sent = quiet_since = now
        self._handle = self._loop.call_at(quiet_since + self._every, self._beat)


CLOCK_SLACK = 0.002  # uvloop's timers run at millisecond resolution


class Drainer:
    """The sink once the client left a ``drain`` route: counts, discards, and stops past
    ``limit`` bytes (the upstream is closed instead)."""

    __slots__ = ("_exchange", "_limit", "_upstream", "_watchdog")

    def __init__(
        self, upstream: Connection, exchange: Exchange, watchdog: Watchdog, limit: int
    ) -> None:
        self._upstream = upstream
        self._exchange = exchange
        self._watchdog = watchdog
        self._limit = limit

    def __call__(self, chunk: bytes) -> None:
        self._watchdog.last = time.monotonic()
        total = (self._exchange.drained_bytes or 0) + len(chunk)
        self._exchange.drained_bytes = total
        if total > self._limit:
            self._upstream.interrupt(DrainLimit())


async def drain(upstream: Connection, exchange: Exchange, watchdog: Watchdog, limit: int) -> bool:
    """Read the upstream to its end with nobody to write to; False past ``limit`` bytes."""
    exchange.drained_bytes = exchange.drained_bytes or 0  # resumes after an absorbed cancel
    upstream.attach(Drainer(upstream, exchange, watchdog, limit))
    try:
        while not await upstream.wait():  # a drainer never pauses; the client's pause may
            upstream.resume()  # still stand from before the client left
    except DrainLimit:
        return False
    return True
