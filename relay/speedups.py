"""The per-chunk path's byte scans, its metrics' binning, its body callback and its sink,
compiled when the install could build them.

The relay's user-space CPU per relayed event is mostly the Python run for each upstream
chunk. Of the 21.5k instructions an event cost, two scans of the chunk were some 9k (framing
it for the client, and the SSE tap's look at it) and binning its times for the metrics about
2.5k; the Python method through which llhttp handed each chunk to its sink was another 0.4k,
the sink's own Python frame (write, clock reads, counters) about 1.4k and the call of the
SSE tap's fast path about 1.2k. Each is now one C call into ``relay._speedups``, built from
``relay/_speedups.c`` by ``pip install`` given a C compiler; the Python versions here run
where it could not be built. The two give the same results for every input
(``tests/test_speedups.py``); ``COMPILED`` says which one runs, and so does the start-up log
record.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

# The byte strings every terminal event carries (relay/sse.py); _speedups.c has them too.
MARKERS = (b"[DONE]", b'"complete"', b'"error"', b"base_resp")


def marked(events: bytes) -> bytes:
    """Whether ``events`` may hold a terminal event (non-empty when so)."""
    # On CPython 3.11 ``bytes.partition`` is the cheapest search there is (about 40 ns;
    # ``find`` parses its arguments the slow way and costs twice that, ``in`` more still).
    return (
        events.partition(MARKERS[0])[1]
        or events.partition(MARKERS[1])[1]
        or events.partition(MARKERS[2])[1]
        or events.partition(MARKERS[3])[1]
    )


def plain_event_py(chunk: bytes) -> int:
    """How a chunk that starts at an event boundary settles, if it is the usual one.

    1 if ``chunk`` is exactly one event that dispatches (it has a ``data`` field), 0 if it
    is exactly one block that dispatches nothing (a comment, say), each ending with the
    chunk's only blank line and holding no CR and no terminal marker; otherwise -1, and
    the SSE tap looks at it the general way.
    """
    event, boundary, rest = chunk.partition(b"\n\n")
    if boundary and not rest and not event.partition(b"\r")[1] and not marked(event):
        return 1 if event[:4] == b"data" or event.partition(b"\ndata")[1] else 0
    return -1


def frame_py(chunk: bytes) -> bytes:
    """``chunk`` in HTTP/1.1 chunked framing: its size in hex, CRLF, the chunk, CRLF."""
    return b"%x\r\n%b\r\n" % (len(chunk), chunk)


MAX_BOUNDS = 20  # per histogram, as in _speedups.c


class ChunkTimesPy:
    """One stream's chunk times, binned as ``Histogram.observe`` bins them.

    :meth:`add` takes each chunk's read and write times: the gap since the previous
    chunk's read and the chunk's forward time (read to written) go to the bucket
    ``bisect_left`` finds among the bounds (each histogram's upper bounds, ending with
    ``inf``), and into a sum. :meth:`take` hands over what accumulated since it last did,
    for ``relay.metrics`` to push into the shared histograms; ``first_written`` is when the
    first chunk was written (the time to first byte), or None before it.
    """

    __slots__ = (
        "_forward_bounds", "_forward_counts", "_forward_sum", "_gap_bounds", "_gap_counts",
        "_gap_sum", "_previous", "first_written",
    )  # fmt: skip

    def __init__(self, gap_bounds: Sequence[float], forward_bounds: Sequence[float]) -> None:
        for bounds in (gap_bounds, forward_bounds):
            if not 1 <= len(bounds) <= MAX_BOUNDS or bounds[-1] != math.inf:
                raise ValueError(f"1 to {MAX_BOUNDS} bounds, the last one inf")
        self._gap_bounds, self._forward_bounds = tuple(gap_bounds), tuple(forward_bounds)
        self._gap_counts = [0] * len(gap_bounds)
        self._forward_counts = [0] * len(forward_bounds)
        self._gap_sum = self._forward_sum = 0.0
        self._previous: float | None = None
        self.first_written: float | None = None

    def add(self, received: float, written: float) -> None:
        previous = self._previous
        if previous is None:
            self.first_written = written
        else:
            gap = received - previous
            self._gap_counts[bisect_left(self._gap_bounds, gap)] += 1
            self._gap_sum += gap
        self._previous = received
        forward = written - received
        self._forward_counts[bisect_left(self._forward_bounds, forward)] += 1
        self._forward_sum += forward

    def take(self) -> tuple[list[int], float, list[int], float]:
        taken = (self._gap_counts, self._gap_sum, self._forward_counts, self._forward_sum)
        self._gap_counts = [0] * len(self._gap_bounds)
        self._forward_counts = [0] * len(self._forward_bounds)
        self._gap_sum = self._forward_sum = 0.0
        return taken


class SwitchPy:
    """A callable that passes its arguments on to its current :attr:`target`.

    httptools looks up a parser's body callback once, when the parser is made, and uvloop a
    protocol's ``data_received`` once, when its transport is made; an upstream connection
    outlives each exchange. So its body callback is a switch pointed at the sink while one
    is attached, and its ``data_received`` one pointed straight at llhttp while a body
    streams in. An :attr:`on_error` other than None is called with what the target raises
    (an ``Exception``), and its result is the call's: the ``on_error`` of when the call
    began, even if the call pointed the switch elsewhere. Compiled, a call through a switch
    runs no Python frame; this twin runs one, as the methods it replaces did.
    """

    __slots__ = ("on_error", "target")

    def __init__(self, target: Callable[..., object]) -> None:
        self.target = target
        self.on_error: Callable[[Exception], object] | None = None

    def __call__(self, *args: object) -> object:
        on_error = self.on_error  # the call's, even if the call replaces it
        if on_error is None:
            return self.target(*args)
        try:
            return self.target(*args)
        except Exception as exc:
            return on_error(exc)


class EventsPy:
    """The SSE tap's fast path (``relay.sse.SseTap`` is its subclass): counts the events of
    the usual chunk, one whole plain event (:func:`plain_event`) arriving while no event is
    unfinished, and hands any other chunk to the subclass's ``_general``, which keeps the
    unfinished part in ``_pending``. The relay's per-chunk sink (:class:`ForwardPy`) calls
    a tap of this kind the fastest way it can: compiled, with no call through Python."""

    __slots__ = ("_pending", "events")

    def __init__(self) -> None:
        self._pending = b""
        self.events = 0

    def __call__(self, chunk: bytes) -> None:
        if not self._pending and (kind := plain_event(chunk)) >= 0:
            self.events += kind
            return
        self._general(chunk)

    def _general(self, chunk: bytes) -> None:
        raise NotImplementedError("the subclass reads the chunks the fast path does not")


class ForwardPy:
    """The sink of a streaming response: writes each body chunk to the client, then records
    it (``relay.pump.Forwarder`` makes one, and documents the whole path).

    A call takes the read time, writes the chunk to ``transport`` (with ``head`` before the
    first one, and framed when ``chunked``: into one buffer under ``small`` bytes, as
    three pieces above), takes the write time, pauses ``upstream`` when ``protocol``
    says the client is full, stores the write time as the ``watchdog``'s last progress,
    shows the chunk to ``tap`` (or None; an :class:`EventsPy` is called through its
    bound method), adds to the ``exchange``'s byte and chunk counts and gives both times
    to ``record``. A client already gone gets nothing: the chunk goes back to
    ``upstream.refuse`` with the error ``gone("the client went away")``.
    """

    __slots__ = (
        "chunked", "exchange", "gone", "head", "protocol", "record", "small", "tap",
        "transport", "upstream", "watchdog",
    )  # fmt: skip

    def __init__(
        self,
        transport: Any,
        protocol: Any,
        upstream: Any,
        exchange: Any,
        record: Callable[[float, float], object],
        watchdog: Any,
        tap: Callable[[bytes], object] | None,
        gone: Callable[[str], BaseException],
        head: bytes,
        chunked: bool,
        small: int,
    ) -> None:
        self.transport, self.protocol, self.upstream = transport, protocol, upstream
        if isinstance(tap, EventsPy):
            tap = tap.__call__  # a bound method is called faster than an object
        self.exchange, self.record, self.watchdog, self.tap = exchange, record, watchdog, tap
        self.gone, self.head, self.chunked, self.small = gone, head, bool(chunked), small

    def __call__(self, chunk: bytes) -> None:
        received = time.monotonic()
        transport = self.transport
        if transport.is_closing():
            self.upstream.refuse(chunk, self.gone("the client went away"))
            return
        size = len(chunk)
        if self.head:
            head, self.head = self.head, b""
            transport.write(head + (frame(chunk) if size and self.chunked else chunk))
        elif not self.chunked:
            transport.write(chunk)
        elif size < self.small:
            transport.write(frame(chunk))
        else:
            transport.writelines((b"%x\r\n" % size, chunk, b"\r\n"))
        written = time.monotonic()
        if self.protocol.writing_paused:
            self.upstream.pause()
        self.watchdog.last = written  # idle time counts only while we wait on the upstream
        if self.tap is not None:
            self.tap(chunk)  # after the write: a passive look never delays the client
        exchange = self.exchange
        exchange.bytes_out += size
        exchange.chunks += 1
        self.record(received, written)


try:
    from relay._speedups import ChunkTimes as ChunkTimes
    from relay._speedups import Events as Events
    from relay._speedups import Forward as Forward
    from relay._speedups import Switch as Switch
    from relay._speedups import frame as frame
    from relay._speedups import plain_event as plain_event
except ImportError:  # installed without a C compiler: the same, in Python
    COMPILED = False
    frame, plain_event = frame_py, plain_event_py
    # mypy checks against the stub's classes; the twins have their interfaces (tested).
    ChunkTimes = ChunkTimesPy  # type: ignore[assignment,misc]
    Events = EventsPy  # type: ignore[assignment,misc]
    Forward = ForwardPy  # type: ignore[assignment,misc]
    Switch = SwitchPy  # type: ignore[assignment,misc]
else:
    COMPILED = True
