"""Errors: the relay's own envelopes, and the upstream's errors passed through unchanged."""

from __future__ import annotations

import asyncio
import socket

import pytest

from relay.state import STATE
from tests.conftest import FAKE_KEY, FakeUpstream, Relay, RelayFactory, read_all, step

STREAM = "/api/v3/wavespeed-ai/any-llm/stream"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _envelope(response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json")
    assert "X-Request-ID" in response.headers
    body = await read_all(response)
    assert FAKE_KEY.encode() not in body
    import json

    return json.loads(body)


async def test_refused_upstream_gives_502(make_relay: RelayFactory) -> None:
    """An upstream that refuses connections yields 502 upstream_unavailable; the stream is
    counted as an upstream error, and its body as never relayed."""
    relay = await make_relay(upstream_url=f"http://127.0.0.1:{_closed_port()}")
    response = await step(relay.client.post(STREAM, data=b"{}"))
    assert response.status == 502
    body = await _envelope(response)
    assert body["data"] == {"error": "upstream_unavailable"}
    assert body["code"] == 502
    model = "wavespeed-ai/any-llm"
    assert relay.metric("relay_streams_total", model=model, outcome="upstream_error") == 1
    assert relay.metric("relay_bytes_total", model=model, direction="client_to_upstream") == 0
    assert relay.metric("relay_active_streams", model=model) == 0


async def test_upstream_reset_before_headers_gives_502(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """An upstream that drops the connection before answering yields 502."""

    async def handler(request):
        request.transport.abort()
        raise ConnectionResetError

    upstream.handler = handler
    response = await step(relay.client.post(STREAM, data=b"{}"))
    assert response.status == 502
    assert (await _envelope(response))["data"]["error"] == "upstream_unavailable"


async def test_silent_upstream_gives_504_at_the_first_byte_deadline(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """An upstream with no response by RELAY_FIRST_BYTE_TIMEOUT: 504, upstream closed."""
    relay = await make_relay(first_byte_timeout=0.2)
    upstream.hang()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    assert response.status == 504
    assert (await _envelope(response))["data"]["error"] == "upstream_timeout"
    await step(upstream.disconnected.wait())


@pytest.mark.parametrize("status", [400, 401, 404, 422, 429, 500, 503])
async def test_upstream_errors_pass_through_unchanged(
    upstream: FakeUpstream, relay: Relay, status: int
) -> None:
    """Status, headers and body of upstream errors reach the client untouched."""
    body = b'{"code": %d, "message": "from upstream", "data": null}' % status
    upstream.respond(status, body, {"Content-Type": "application/json", "Retry-After": "7"})
    response = await step(relay.client.post(STREAM, data=b"{}"))
    assert response.status == status
    assert response.headers["Retry-After"] == "7"
    assert response.headers["Content-Type"] == "application/json"
    assert await read_all(response) == body


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/", 404, "not_found"),
        ("GET", "/v1/chat/completions", 404, "not_found"),
        ("GET", "/api/v3/wavespeed-ai/any-llm/stream", 405, "method_not_allowed"),
        ("DELETE", "/api/v3/predictions/abc", 405, "method_not_allowed"),
        ("POST", "/api/v3/Bad/Model", 400, "bad_request"),
    ],
)
async def test_relay_errors_use_the_envelope(
    upstream: FakeUpstream, relay: Relay, method: str, path: str, status: int, code: str
) -> None:
    """Every error the relay makes is the WaveSpeed envelope with its data.error code."""
    response = await step(relay.client.request(method, path))
    assert response.status == status
    body = await _envelope(response)
    assert body["code"] == status
    assert body["data"] == {"error": code}
    assert isinstance(body["message"], str)
    assert not upstream.seen


async def test_oversized_body_gives_413_without_upstream_contact(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A body over RELAY_MAX_BODY_BYTES is refused with 413 before the upstream is asked."""
    relay = await make_relay(max_body_bytes=1000)
    response = await step(relay.client.post(STREAM, data=b"x" * 1001))
    assert response.status == 413
    assert (await _envelope(response))["data"]["error"] == "payload_too_large"
    assert not upstream.seen


async def test_oversized_chunked_body_gives_413(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A chunked body (no Content-Length) that grows past the limit is refused too."""
    relay = await make_relay(max_body_bytes=1000)

    async def body():
        for _ in range(10):
            yield b"x" * 500

    response = await step(relay.client.post(STREAM, data=body()))
    assert response.status == 413
    assert not upstream.seen


async def test_polling_is_relayed_without_a_model(upstream: FakeUpstream, relay: Relay) -> None:
    """GET /api/v3/predictions/{id}/result goes to the same path upstream, query kept."""
    upstream.respond(200, b'{"code":200,"data":{"id":"task-1","status":"completed"}}')
    await read_all(await step(relay.client.post("/api/v3/acme/model", data=b"{}")))
    response = await step(relay.client.get("/api/v3/predictions/task-1/result?v=2"))
    assert response.status == 200
    await read_all(response)
    assert upstream.seen[1].method == "GET"
    assert upstream.seen[1].path_qs == "/api/v3/predictions/task-1/result?v=2"


async def test_client_leaving_mid_upload_never_reaches_the_upstream(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """A client that sends part of its body and leaves is recorded as 499; no upstream contact."""
    metrics, finished = relay.app[STATE].metrics, asyncio.Event()
    record = metrics.finish

    def finish(exchange, duration) -> None:  # the request's bookkeeping, observed
        record(exchange, duration)
        finished.set()

    metrics.finish = finish  # type: ignore[method-assign]
    host, port = relay.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/v3/wavespeed-ai/any-llm/stream HTTP/1.1\r\nHost: r\r\n"
        b"Content-Length: 1000\r\n\r\n" + b"{" * 10
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await step(finished.wait())
    assert relay.metric("relay_requests_total", route="stream", model="-", code="499") == 1
    assert not upstream.seen
    assert not relay.app[STATE].streams
