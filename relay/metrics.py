"""Every ``relay_*`` metric, owned by one :class:`RelayMetrics` per app (a fresh registry per
test). Label children for a stream are resolved once, in :meth:`RelayMetrics.stream`, so the
per-chunk path only calls methods on objects it already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relay.exchange import Exchange

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


@dataclass(slots=True)
class StreamMeters:
    """The label children one stream touches, resolved when the stream opens."""

    ttfb: Any
    gap: Any
    forward: Any
    bytes_out: Any
    bytes_in: Any
    chunks: Any
    active: Any
    sse_events: Any


class RelayMetrics:
    """The metrics contract of ``SPEC.md``, plus the SSE insight of the README."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "relay_requests",
            "Requests handled, by route, model and status code.",
            ["route", "model", "code"],
            registry=r,
        )
        self.rejections = Counter(
            "relay_rejections",
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
            "relay_bytes",
            "Body bytes relayed, by direction.",
            ["model", "direction"],
            registry=r,
        )
        self.chunks = Counter(
            "relay_chunks", "Upstream chunks relayed to the client.", ["model"], registry=r
        )
        self.duration = Histogram(
            "relay_stream_duration_seconds",
            "Stream duration from request to end, by outcome.",
            ["model", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.streams = Counter(
            "relay_streams", "Streams ended, by outcome.", ["model", "outcome"], registry=r
        )
        self.sse_events = Counter(
            "relay_sse_events", "Server-sent events relayed.", ["model"], registry=r
        )
        self.terminals = Counter(
            "relay_stream_terminals",
            "How event streams ended: the last terminal event seen, or none.",
            ["model", "terminal"],
            registry=r,
        )

    def stream(self, model: str) -> StreamMeters:
        return StreamMeters(
            ttfb=self.ttfb.labels(model),
            gap=self.gap.labels(model),
            forward=self.forward.labels(model),
            bytes_out=self.bytes.labels(model, "upstream_to_client"),
            bytes_in=self.bytes.labels(model, "client_to_upstream"),
            chunks=self.chunks.labels(model),
            active=self.active.labels(model),
            sse_events=self.sse_events.labels(model),
        )

    def finish(self, exchange: Exchange, duration: float) -> None:
        """Record a finished request: called once per request, also on cancellation."""
        self.requests.labels(exchange.route, exchange.model, str(exchange.status)).inc()
        if exchange.error is not None:
            self.rejections.labels(exchange.error).inc()
        if exchange.upstream_contacted:
            self.duration.labels(exchange.model, exchange.outcome).observe(duration)
            self.streams.labels(exchange.model, exchange.outcome).inc()
