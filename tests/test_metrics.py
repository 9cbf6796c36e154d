"""Metrics after scripted streams: exact deltas for bytes, chunks, outcomes and terminals."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.metrics import TTFB_BUCKETS
from relay.state import STATE
from tests.conftest import (
    STEP,
    FakeUpstream,
    Relay,
    RelayFactory,
    give_up_before_headers,
    read_all,
    step,
)

STREAM = "/api/v3/wavespeed-ai/any-llm/stream"
MODEL = "wavespeed-ai/any-llm"


async def _settled(relay: Relay) -> None:
    """Wait until every stream has ended and been recorded."""
    assert await relay.app[STATE].wait_streams_closed(STEP)


def _stream_count(relay: Relay, outcome: str) -> float:
    return relay.metric("relay_streams_total", model=MODEL, outcome=outcome)


async def test_a_completed_stream_is_counted_exactly(upstream: FakeUpstream, relay: Relay) -> None:
    """Bytes equal what the client received; chunks, events, terminal and TTFB are recorded."""
    feed = upstream.stream()
    events = [b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % i for i in range(7)]
    response = await step(relay.client.post(STREAM, data=b'{"prompt":"x"}'))
    for event in events:
        feed.send(event)
        await step(response.content.readexactly(len(event)))
    feed.send(b"data: [DONE]\n\n")
    feed.end()
    received = b"".join(events) + await read_all(response)
    await _settled(relay)

    assert relay.metric("relay_bytes_total", model=MODEL, direction="upstream_to_client") == len(
        received
    )
    assert relay.metric("relay_bytes_total", model=MODEL, direction="client_to_upstream") == 14
    assert relay.metric("relay_chunks_total", model=MODEL) == 8
    assert relay.metric("relay_sse_events_total", model=MODEL) == 8
    assert relay.metric("relay_stream_terminals_total", model=MODEL, terminal="done") == 1
    assert _stream_count(relay, "completed") == 1
    assert relay.metric("relay_requests_total", route="stream", model=MODEL, code="200") == 1
    assert relay.metric("relay_time_to_first_byte_seconds_count", model=MODEL) == 1
    assert relay.metric("relay_chunk_gap_seconds_count", model=MODEL) == 7
    assert relay.metric("relay_chunk_forward_seconds_count", model=MODEL) == 8
    assert (
        relay.metric("relay_stream_duration_seconds_count", model=MODEL, outcome="completed") == 1
    )
    assert relay.metric("relay_active_streams", model=MODEL) == 0


async def test_a_clean_end_without_terminal_event_is_terminal_none(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """Transport completed, but no [DONE]: outcome completed, terminal none (truncated)."""
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    feed.send(b'data: {"choices":[{"delta":{"content":"half"}}]}\n\n')
    feed.end()
    await read_all(response)
    await _settled(relay)
    assert _stream_count(relay, "completed") == 1
    assert relay.metric("relay_stream_terminals_total", model=MODEL, terminal="none") == 1


async def test_active_streams_gauge_follows_open_streams(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """relay_active_streams is 1 while a stream is open and 0 after."""
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    assert relay.metric("relay_active_streams", model=MODEL) == 1
    feed.end()
    await read_all(response)
    await _settled(relay)
    assert relay.metric("relay_active_streams", model=MODEL) == 0


async def test_a_quiet_open_stream_is_in_the_metrics_within_a_flush_period(
    upstream: FakeUpstream, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that goes quiet after a burst still shows its chunks, and its time to first
    byte, while it stays open: the periodic flush does not wait for the stream's next chunk
    or its end."""
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 0.01)
    flushed = asyncio.Event()
    flush_open = metrics.RelayMetrics._flush_open

    def flush_and_tell(self: metrics.RelayMetrics) -> None:
        flush_open(self)
        flushed.set()

    monkeypatch.setattr(metrics.RelayMetrics, "_flush_open", flush_and_tell)
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    feed.send(b"data: 1\n\n")
    await step(response.content.readexactly(9))
    flushed.clear()
    await step(flushed.wait())  # the next flush, while the upstream stays quiet
    assert relay.metric("relay_bytes_total", model=MODEL, direction="upstream_to_client") == 9
    assert relay.metric("relay_chunks_total", model=MODEL) == 1
    assert relay.metric("relay_sse_events_total", model=MODEL) == 1
    assert relay.metric("relay_chunk_forward_seconds_count", model=MODEL) == 1
    assert relay.metric("relay_time_to_first_byte_seconds_count", model=MODEL) == 1
    feed.end()
    await read_all(response)
    await _settled(relay)
    assert relay.metric("relay_bytes_total", model=MODEL, direction="upstream_to_client") == 9


async def test_client_closed_outcome(upstream: FakeUpstream, relay: Relay) -> None:
    """A client leaving mid-stream is recorded as client_closed with its bytes so far."""
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    feed.send(b"data: 1\n\n")
    await step(response.content.readexactly(9))
    response.close()
    await step(upstream.disconnected.wait())
    await _settled(relay)
    assert _stream_count(relay, "client_closed") == 1
    assert relay.metric("relay_bytes_total", model=MODEL, direction="upstream_to_client") == 9
    assert relay.metric("relay_stream_terminals_total", model=MODEL, terminal="none") == 1


async def test_upstream_error_outcome(upstream: FakeUpstream, relay: Relay) -> None:
    """An upstream cut mid-body is recorded as upstream_error."""
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    feed.send(b"data: 1\n\n")
    feed.abort()
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all(response)
    await _settled(relay)
    assert _stream_count(relay, "upstream_error") == 1


@pytest.mark.parametrize(
    ("overrides", "outcome"),
    [
        ({"idle_timeout": 0.1}, "idle_timeout"),
        ({"max_stream_seconds": 0.2, "first_byte_timeout": 0.2}, "max_duration"),
    ],
)
async def test_deadline_outcomes(
    upstream: FakeUpstream, make_relay: RelayFactory, overrides: dict, outcome: str
) -> None:
    """A stream cut by the idle or maximum-duration deadline is recorded as such."""
    relay = await make_relay(**overrides)
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    feed.send(b"data: 1\n\n")
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all(response)
    await _settled(relay)
    assert _stream_count(relay, outcome) == 1


async def test_ttfb_timeout_outcome(upstream: FakeUpstream, make_relay: RelayFactory) -> None:
    """No upstream headers before the first-byte deadline: 504, outcome ttfb_timeout."""
    relay = await make_relay(first_byte_timeout=0.1)
    upstream.hang()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    assert response.status == 504
    await _settled(relay)
    assert _stream_count(relay, "ttfb_timeout") == 1
    assert relay.metric("relay_rejections_total", reason="upstream_timeout") == 1
    assert relay.metric("relay_requests_total", route="stream", model=MODEL, code="504") == 1


async def test_rejections_are_counted_by_reason(upstream: FakeUpstream, relay: Relay) -> None:
    """Refused requests count in relay_requests_total and relay_rejections_total, model '-'."""
    for path in (
        "/api/v3/other/model/stream",
        "/api/v3/other/model/stream",
        "/api/v3/BAD/stream",
        "/nope",
    ):
        response = await relay.client.post(path, data=b"{}")
        await read_all(response)
    assert relay.metric("relay_rejections_total", reason="model_not_allowed") == 2
    assert relay.metric("relay_rejections_total", reason="bad_request") == 1
    assert relay.metric("relay_rejections_total", reason="not_found") == 1
    assert relay.metric("relay_requests_total", route="stream", model="-", code="403") == 2
    assert relay.metric("relay_requests_total", route="-", model="-", code="404") == 1
    assert not upstream.seen


async def test_cancelled_before_headers_is_still_recorded(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """A request whose client gives up before the upstream answers is counted (code 499)."""
    await give_up_before_headers(relay, upstream, STREAM)
    await _settled(relay)
    assert _stream_count(relay, "client_closed") == 1
    assert relay.metric("relay_requests_total", route="stream", model=MODEL, code="499") == 1


async def test_every_spec_family_is_exported_with_its_labels() -> None:
    """The registry exposes each SPEC metric with exactly the SPEC's labels and type."""
    from relay.exchange import Exchange
    from relay.metrics import RelayMetrics
    from relay.sse import SseTap

    metrics = RelayMetrics()
    exchange = Exchange(request_id="r", client="c", started=0.0)
    meters = metrics.stream(MODEL, exchange)
    meters.events = SseTap()
    meters.events(b"data: x\n\n")
    exchange.bytes_out, exchange.chunks = 9, 1
    meters.chunk(0.5, 0.6)
    meters.chunk(0.7, 0.8)
    meters.close()
    meters.bytes_in.inc()
    meters.active.inc()
    metrics.requests.labels("stream", MODEL, "200").inc()
    metrics.rejections.labels("bad_request").inc()
    metrics.duration.labels(MODEL, "completed").observe(1)
    metrics.streams.labels(MODEL, "completed").inc()
    metrics.terminals.labels(MODEL, "done").inc()
    families = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
    }
    expected = {
        "relay_requests": ("counter", {"route", "model", "code"}),
        "relay_rejections": ("counter", {"reason"}),
        "relay_active_streams": ("gauge", {"model"}),
        "relay_time_to_first_byte_seconds": ("histogram", {"model"}),
        "relay_chunk_gap_seconds": ("histogram", {"model"}),
        "relay_chunk_forward_seconds": ("histogram", {"model"}),
        "relay_bytes": ("counter", {"model", "direction"}),
        "relay_chunks": ("counter", {"model"}),
        "relay_stream_duration_seconds": ("histogram", {"model", "outcome"}),
        "relay_streams": ("counter", {"model", "outcome"}),
        "relay_sse_events": ("counter", {"model"}),
        "relay_stream_terminals": ("counter", {"model", "terminal"}),
    }
    for name, (kind, labels) in expected.items():
        family = families[name]
        assert family.type == kind, name
        sample = next(s for s in family.samples if not s.name.endswith("_created"))
        assert set(sample.labels) - {"le"} == labels, name
    assert max(TTFB_BUCKETS) >= 300


async def test_metrics_endpoint_on_a_shared_listener(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """With RELAY_ADMIN_PORT equal to RELAY_PORT, /metrics and health share the listener."""
    relay = await make_relay(port=18123, admin_port=18123)
    response = await relay.client.get("/metrics")
    assert response.status == 200
    assert (
        "relay_requests_total" in await response.text() or "relay_requests" in await response.text()
    )
    assert (await relay.client.get("/healthz")).status == 200
    assert (await relay.client.get("/readyz")).status == 200


@pytest.mark.parametrize("times_class", ["as installed", "pure Python"])
async def test_batched_stream_meters_equal_direct_observations(
    times_class: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Binning per stream and flushing gives the same histograms as one observe per chunk,
    with the binning compiled (where built) and in Python."""
    import random

    import relay.metrics
    from relay.exchange import Exchange
    from relay.metrics import RelayMetrics
    from relay.speedups import ChunkTimesPy

    if times_class == "pure Python":
        monkeypatch.setattr(relay.metrics, "ChunkTimes", ChunkTimesPy)

    rng = random.Random(7)
    times, now = [], 100.0
    for _ in range(500):
        now += rng.choice([0.0, 0.00004, 0.0003, 0.002, 0.04, 0.7, 3.0, 200.0])
        times.append((now, now + rng.choice([0.0, 0.00005, 0.0002, 0.004, 0.3, 9.0])))

    batched = RelayMetrics()
    exchange = Exchange(request_id="r", client="c", started=99.0)
    meters = batched.stream(MODEL, exchange)
    for received, written in times:
        exchange.bytes_out += 10
        exchange.chunks += 1
        meters.chunk(received, written)
    meters.close()

    direct = RelayMetrics()
    direct.ttfb.labels(MODEL).observe(times[0][1] - 99.0)
    for (previous, _), (received, _) in itertools.pairwise(times):
        direct.gap.labels(MODEL).observe(received - previous)
    for received, written in times:
        direct.forward.labels(MODEL).observe(written - received)
    direct.bytes.labels(MODEL, "upstream_to_client").inc(5000)
    direct.bytes.labels(MODEL, "client_to_upstream")  # resolved with the stream, still zero
    direct.chunks.labels(MODEL).inc(500)

    def samples(metrics: RelayMetrics) -> dict:
        text = generate_latest(metrics.registry).decode()
        wanted = (
            "relay_chunk_gap",
            "relay_chunk_forward",
            "relay_time_to_first",
            "relay_bytes",
            "relay_chunks",
        )
        return {
            (s.name, tuple(sorted(s.labels.items()))): round(s.value, 6)
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith(wanted) and not s.name.endswith("_created")
        }

    assert samples(batched) == samples(direct)
    assert exchange.first_byte_at == times[0][1]


def test_finished_requests_are_recorded_as_labels_and_observe_would_record_them() -> None:
    """``finish`` and ``terminal`` keep the label children they resolve and bin durations
    themselves; what they record equals ``.labels(...).observe()`` per request, bucket
    bounds included."""
    from relay.exchange import Exchange
    from relay.metrics import DURATION_BUCKETS, RelayMetrics

    kept, direct = RelayMetrics(), RelayMetrics()
    for i, duration in enumerate([0.0, 0.3, 7.0, 5000.0, *DURATION_BUCKETS]):
        exchange = Exchange(request_id="r", client="c", started=0.0)
        exchange.route, exchange.model, exchange.upstream_contacted = "stream", MODEL, True
        exchange.status, exchange.outcome = [(200, "completed"), (502, "upstream_error")][i % 2]
        kept.finish(exchange, duration)
        kept.terminal(MODEL, "done")
        direct.requests.labels("stream", MODEL, str(exchange.status)).inc()
        direct.duration.labels(MODEL, exchange.outcome).observe(duration)
        direct.streams.labels(MODEL, exchange.outcome).inc()
        direct.terminals.labels(MODEL, "done").inc()

    def samples(recorded: RelayMetrics) -> dict:
        text = generate_latest(recorded.registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(kept) == samples(direct)
    assert samples(kept)[("relay_streams_total", (("model", MODEL), ("outcome", "completed")))]


async def test_family_matches_are_labelled_by_their_pattern(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """Ids admitted by `acme/*` share the label `acme/*`: label sets stay as small as the allowlist."""
    upstream.respond(200, b"{}")
    for model in ("acme/one", "acme/two/deep"):
        await read_all(await relay.client.post(f"/api/v3/{model}/stream", data=b"{}"))
    await _settled(relay)
    assert relay.metric("relay_streams_total", model="acme/*", outcome="completed") == 2
    assert relay.metric("relay_streams_total", model="acme/one", outcome="completed") == 0
