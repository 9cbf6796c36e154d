"""Every ``relay_*`` metric, owned by one :class:`RelayMetrics` per app (a fresh registry per
test). Label children for a stream are resolved once, in :meth:`RelayMetrics.stream`, and
the per-chunk figures are batched per stream (:class:`StreamMeters`).
"""

from __future__ import annotations

import asyncio
import math
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relay.exchange import Exchange
from relay.speedups import ChunkTimes

if TYPE_CHECKING:
    from relay.sse import SseTap

# Speech and video first bytes can take minutes: up to 10 min.
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The relay's own delay per chunk: fine resolution below 10 ms.
FORWARD_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.5,
    1,
    5,
)
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

TERMINALS = ("done", "complete", "error", "none")


FLUSH_SECONDS = 1.0  # how far /metrics may lag an open stream's chunk figures
_TTFB_BOUNDS = (*TTFB_BUCKETS, math.inf)
_GAP_BOUNDS = (*GAP_BUCKETS, math.inf)
_FORWARD_BOUNDS = (*FORWARD_BUCKETS, math.inf)
_DURATION_BOUNDS = (*DURATION_BUCKETS, math.inf)


class StreamMeters:
    """One stream's label children, and its per-chunk figures kept in plain numbers.

    :attr:`chunk` runs once per chunk and touches no lock and no prometheus object: it is
    :class:`~relay.speedups.ChunkTimes`'s ``add`` (C where built), which bins the gap and
    forward times into local bucket counts (the bins ``Histogram.observe`` would pick),
    while the stream's byte and chunk totals live in its :class:`Exchange`. :meth:`flush`
    pushes what accumulated into the shared metrics, the time to first byte included:
    :class:`RelayMetrics` calls it for every open stream each ``FLUSH_SECONDS`` (so a
    stream that goes quiet after a burst is not left behind), and :meth:`close` once more
    when the stream ends.
    """

    __slots__ = (
        "_bytes_flushed", "_bytes_out", "_chunks", "_chunks_flushed", "_events_flushed",
        "_exchange", "_forward", "_gap", "_live", "_sse_events", "_times", "active",
        "bytes_in", "chunk", "events", "ttfb",
    )  # fmt: skip

    def __init__(
        self, children: tuple[Any, ...], exchange: Exchange, live: set[StreamMeters]
    ) -> None:
        (
            self.ttfb, self.active, self.bytes_in, self._gap, self._forward,
            self._bytes_out, self._chunks, self._sse_events,
        ) = children  # fmt: skip
        self._exchange = exchange
        self.events: SseTap | None = None  # an event stream's tap, whose count is flushed
        self._times = ChunkTimes(_GAP_BOUNDS, _FORWARD_BOUNDS)
        # One chunk, read from the upstream at ``received`` and written at ``written``.
        self.chunk: Callable[[float, float], None] = self._times.add
        self._bytes_flushed = self._chunks_flushed = self._events_flushed = 0
        self._live = live
        live.add(self)

    def close(self) -> None:
        """The stream ended: push what is left, and leave the periodic flush."""
        self._live.discard(self)
        self.flush()

    def flush(self) -> None:
        """Push the figures gathered since the last flush into the shared metrics."""
        exchange = self._exchange
        if exchange.chunks == self._chunks_flushed:
            return  # no chunk since: nothing else can have changed either
        if exchange.first_byte_at is None and (first := self._times.first_written) is not None:
            exchange.first_byte_at = first
            _observe(self.ttfb, _TTFB_BOUNDS, first - exchange.started)
        gap_counts, gap_sum, forward_counts, forward_sum = self._times.take()
        _add(self._gap, gap_counts, gap_sum)
        _add(self._forward, forward_counts, forward_sum)
        if exchange.bytes_out > self._bytes_flushed:
            self._bytes_out.inc(exchange.bytes_out - self._bytes_flushed)
            self._bytes_flushed = exchange.bytes_out
        if exchange.chunks > self._chunks_flushed:
            self._chunks.inc(exchange.chunks - self._chunks_flushed)
            self._chunks_flushed = exchange.chunks
        if self.events is not None and self.events.events > self._events_flushed:
            self._sse_events.inc(self.events.events - self._events_flushed)
            self._events_flushed = self.events.events


def _observe(histogram: Any, bounds: tuple[float, ...], value: float) -> None:
    """``histogram.observe(value)`` for a child whose ``bounds`` are given, without its
    per-call checks and its loop over the buckets (the fields are :func:`_add`'s)."""
    histogram._sum.inc(value)
    histogram._buckets[bisect_left(bounds, value)].inc(1)


def _add(histogram: Any, counts: list[int], total: float) -> None:
    """Add binned observations to a histogram child, as that many ``observe`` calls would.

    prometheus_client keeps per-bucket values (``_buckets``) and the sum (``_sum``) on the
    child; tests/test_metrics.py checks that this stays equal to calling ``observe``.
    """
    if not any(counts):
        return
    histogram._sum.inc(total)
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(count)


class RelayMetrics:
    """The metrics contract of ``SPEC.md``, plus the SSE insight of the README."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._children: dict[str, tuple[Any, ...]] = {}
        self._kept: dict[tuple[Any, tuple[str, ...]], Any] = {}  # see _child
        self._live: set[StreamMeters] = set()  # the open streams' meters
        self._flusher: asyncio.TimerHandle | None = None
        r = self.registry
        self.requests = Counter(
            "relay_requests_total",
            "Requests handled, by route, model and status code.",
            ["route", "model", "code"],
            registry=r,
        )
        self.rejections = Counter(
            "relay_rejections_total",
            "Requests the relay answered itself, by data.error.",
            ["reason"],
            registry=r,
        )
        self.active = Gauge(
            "relay_active_streams",
            "Streams open right now.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ttfb = Histogram(
            "relay_time_to_first_byte_seconds",
            "Request received to the first upstream body byte written to the client.",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.gap = Histogram(
            "relay_chunk_gap_seconds",
            "Time between consecutive upstream chunks.",
            ["model"],
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.forward = Histogram(
            "relay_chunk_forward_seconds",
            "One chunk read from the upstream until written to the client (includes waiting "
            "on a slow client).",
            ["model"],
            buckets=FORWARD_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "relay_bytes_total",
            "Body bytes relayed, by direction.",
            ["model", "direction"],
            registry=r,
        )
        self.chunks = Counter(
            "relay_chunks_total", "Upstream chunks relayed to the client.", ["model"], registry=r
        )
        self.duration = Histogram(
            "relay_stream_duration_seconds",
            "Stream duration from request to end, by outcome.",
            ["model", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.streams = Counter(
            "relay_streams_total", "Streams ended, by outcome.", ["model", "outcome"], registry=r
        )
        self.sse_events = Counter(
            "relay_sse_events_total", "Server-sent events relayed.", ["model"], registry=r
        )
        self.terminals = Counter(
            "relay_stream_terminals_total",
            "How event streams ended: the last terminal event seen, or none.",
            ["model", "terminal"],
            registry=r,
        )

    def stream(self, model: str, exchange: Exchange) -> StreamMeters:
        """The meters of one stream, with the model's label children resolved once."""
        children = self._children.get(model)
        if children is None:  # models are allowlist labels: this stays small
            children = self._children[model] = (
                self.ttfb.labels(model),
                self.active.labels(model),
                self.bytes.labels(model, "client_to_upstream"),
                self.gap.labels(model),
                self.forward.labels(model),
                self.bytes.labels(model, "upstream_to_client"),
                self.chunks.labels(model),
                self.sse_events.labels(model),
            )
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush_open)
        return StreamMeters(children, exchange, self._live)

    def _flush_open(self) -> None:
        """Push every open stream's figures; one timer for the process, while streams run."""
        for meters in self._live:
            meters.flush()
        self._flusher = None
        if self._live:
            self._flusher = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush_open)

    def finish(self, exchange: Exchange, duration: float) -> None:
        """Record a finished request: called once per request, also on cancellation."""
        self._child(self.requests, exchange.route, exchange.model, str(exchange.status)).inc()
        if exchange.error is not None:
            self._child(self.rejections, exchange.error).inc()
        if exchange.upstream_contacted:
            histogram = self._child(self.duration, exchange.model, exchange.outcome)
            _observe(histogram, _DURATION_BOUNDS, duration)
            self._child(self.streams, exchange.model, exchange.outcome).inc()

    def terminal(self, model: str, terminal: str) -> None:
        """Count how an event stream ended (``TERMINALS``)."""
        self._child(self.terminals, model, terminal).inc()

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: resolving label children is a good part of
        what recording a request costs, and the values (routes, allowlisted models, status
        codes, outcomes, error codes) come from bounded sets."""
        key = (metric, values)
        child = self._kept.get(key)
        if child is None:
            child = self._kept[key] = metric.labels(*values)
        return child
