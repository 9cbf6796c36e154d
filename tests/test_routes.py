"""Configured routes: OpenAI-compatible streaming, binary TTS, uploads, drain, heartbeats."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import openai
import pytest

from relay.config import ConfigError, load_config
from relay.exchange import Exchange
from relay.pump import HEARTBEAT, Heartbeat
from relay.routes import Endpoint, Route
from relay.sse import SseTap
from relay.state import STATE
from tests.conftest import FAKE_KEY, SSE, STEP, FakeUpstream, Relay, RelayFactory, read_all, step

LLM_KEY = "sk-llm-FAKE-abcdef0123456789"
TTS_KEY = "xi-FAKE-0123456789abcdef"


def llm_route(upstream: FakeUpstream, **overrides) -> Route:
    fields = {
        "name": "llm",
        "prefix": "/v1",
        "upstream": upstream.url + "/v1",
        "key": LLM_KEY,
        "model_from": "json",
        "allowed_models": ("openai/gpt-4o-mini", "anthropic/*"),
        "paths": ("/chat/completions", "/audio/speech", "/audio/transcriptions"),
    }
    return Route(**{**fields, **overrides})


def tts_route(upstream: FakeUpstream, **overrides) -> Route:
    fields = {
        "name": "tts",
        "prefix": "/tts",
        "upstream": upstream.url,
        "key": TTS_KEY,
        "auth_header": "xi-api-key",
        "model_from": "none",
        "paths": ("/text-to-speech/stream",),
    }
    return Route(**{**fields, **overrides})


def delta(text: str) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "openai/gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def test_openai_sdk_streams_token_by_token_through_the_relay(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """The official OpenAI SDK gets each delta before the upstream sends the next one."""
    relay = await make_relay(routes=(llm_route(upstream),))
    feed = upstream.stream(SSE)
    words = ["Once", " upon", " a", " time"]
    feed.send(delta(words[0]))
    received = []
    async with openai.AsyncOpenAI(
        base_url=relay.url + "/v1", api_key="browser-side-nothing", max_retries=0
    ) as client:
        stream = await step(
            client.chat.completions.create(
                model="openai/gpt-4o-mini",
                messages=[{"role": "user", "content": "story"}],
                stream=True,
            )
        )
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
            if len(received) < len(words):
                feed.send(delta(words[len(received)]))
            else:
                feed.send(b"data: [DONE]\n\n")
                feed.end()
    assert received == words
    (seen,) = upstream.seen
    assert seen.path_qs == "/v1/chat/completions"
    assert seen.headers["authorization"] == [f"Bearer {LLM_KEY}"]
    assert json.loads(seen.body)["model"] == "openai/gpt-4o-mini"
    assert await relay.app[STATE].wait_streams_closed(STEP)
    assert relay.metric("relay_streams_total", model="openai/gpt-4o-mini", outcome="completed") == 1
    assert (
        relay.metric("relay_requests_total", route="llm", model="openai/gpt-4o-mini", code="200")
        == 1
    )


async def test_openai_sdk_gets_403_for_a_model_off_the_route_list(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A model the route does not allow is refused before the upstream, as a 403 to the SDK."""
    relay = await make_relay(routes=(llm_route(upstream),))
    async with openai.AsyncOpenAI(base_url=relay.url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.PermissionDeniedError) as error:
            await client.chat.completions.create(
                model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
            )
    assert "not allowed" in str(error.value)
    assert not upstream.seen


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"messages": []}', 400),
        (b'{"model": 42}', 400),
        (b"not json", 400),
        (b'{"model": "anthropic/claude-x"}', 200),
    ],
)
async def test_json_model_is_read_once_and_the_bytes_forwarded(
    upstream: FakeUpstream, make_relay: RelayFactory, body: bytes, status: int
) -> None:
    """A missing or non-string model is 400; an allowed one forwards the original bytes."""
    relay = await make_relay(routes=(llm_route(upstream),))
    upstream.respond(200, b"{}", {"Content-Type": "application/json"})
    response = await relay.client.post("/v1/chat/completions", data=body)
    assert response.status == status
    assert [s.body for s in upstream.seen] == ([body] if status == 200 else [])


async def test_binary_tts_route_with_a_vendor_key_header(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """Raw audio relays byte-identically; the key goes in the vendor's header, raw."""
    relay = await make_relay(routes=(tts_route(upstream),))
    audio = [os.urandom(4096) for _ in range(8)]
    feed = upstream.stream("audio/mpeg")
    response = await step(
        relay.client.post(
            "/tts/text-to-speech/stream",
            json={"text": "hello"},
            headers={"xi-api-key": "client-should-not-pass", "Authorization": "Bearer nope"},
        )
    )
    for chunk in audio:
        feed.send(chunk)
        assert await step(response.content.readexactly(len(chunk))) == chunk
    feed.end()
    assert await read_all(response) == b""
    assert response.headers["Content-Type"] == "audio/mpeg"
    (seen,) = upstream.seen
    assert seen.path_qs == "/text-to-speech/stream"
    assert seen.headers["xi-api-key"] == [TTS_KEY]
    assert "authorization" not in seen.headers


async def test_tts_errors_pass_through_as_json(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """The vendor's JSON error reaches the client unchanged."""
    relay = await make_relay(routes=(tts_route(upstream),))
    error = b'{"detail": {"status": "quota_exceeded"}}'
    upstream.respond(429, error, {"Content-Type": "application/json"})
    response = await relay.client.post("/tts/text-to-speech/stream", json={"text": "x"})
    assert response.status == 429
    assert await read_all(response) == error


def _multipart(boundary: str, audio: bytes, model: str) -> bytes:
    b = boundary.encode()
    return b"".join(
        [
            b"--" + b + b'\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
            b"Content-Type: audio/mpeg\r\n\r\n" + audio + b"\r\n",
            b"--" + b + b'\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n',
            b"--"
            + b
            + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
            + model.encode()
            + b"\r\n",
            b"--" + b + b"--\r\n",
        ]
    )


@pytest.mark.parametrize(
    ("model", "status"), [("openai/gpt-4o-mini", 200), ("openai/whisper-1", 403)]
)
async def test_transcription_upload_is_checked_and_forwarded_identically(
    upstream: FakeUpstream, make_relay: RelayFactory, model: str, status: int
) -> None:
    """A 3 MiB multipart upload, model field last: checked, then forwarded byte for byte."""
    relay = await make_relay(routes=(llm_route(upstream),))
    boundary = "----relay-test-boundary"
    body = _multipart(boundary, os.urandom(3 * 1024 * 1024), model)
    feed = upstream.stream(SSE)
    for word in ("Hello", " world"):
        feed.send(b'data: {"text":"%s"}\n\n' % word.encode())
    feed.send(b"data: [DONE]\n\n")
    feed.end()
    response = await step(
        relay.client.post(
            "/v1/audio/transcriptions",
            data=io.BytesIO(body),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    )
    text = await read_all(response)
    assert response.status == status, text
    if status == 200:
        assert text.endswith(b"data: [DONE]\n\n")
        (seen,) = upstream.seen
        assert seen.body == body
        assert seen.headers["content-length"] == [str(len(body))]
    else:
        assert not upstream.seen


async def test_upload_over_its_limit_is_413(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """Uploads have their own limit, max_upload_bytes, checked while spooling."""
    relay = await make_relay(routes=(llm_route(upstream, max_upload_bytes=1000),))
    boundary = "b"
    response = await relay.client.post(
        "/v1/audio/transcriptions",
        data=_multipart(boundary, b"x" * 2000, "openai/gpt-4o-mini"),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status == 413
    assert not upstream.seen


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/models", 404),
        ("POST", "/v1/chat/completions/extra", 404),
        ("POST", "/v1", 404),
        ("POST", "/v1/chat//completions", 400),
        ("POST", "/v1/chat/%63ompletions", 400),
        ("POST", "/v1/../api/v3/x", 400),
        ("GET", "/v1/chat/completions", 405),
    ],
)
async def test_paths_outside_a_route_are_refused_without_upstream_contact(
    upstream: FakeUpstream, make_relay: RelayFactory, method: str, path: str, status: int
) -> None:
    """Only the listed paths, matched exactly on the raw path, are relayed."""
    from tests.conftest import raw_request

    relay = await make_relay(routes=(llm_route(upstream),))
    upstream.respond(200, b"{}")
    head = await raw_request(
        relay.url, f"{method} {path} HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    assert head.split(b" ")[1] == str(status).encode()
    assert not upstream.seen


async def test_drain_keeps_reading_after_the_client_leaves(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """With on_disconnect=drain the upstream is read to its end and the outcome is drained."""
    relay = await make_relay(routes=(tts_route(upstream, on_disconnect="drain"),))
    feed = upstream.stream("audio/mpeg")
    response = await step(relay.client.post("/tts/text-to-speech/stream", json={"text": "x"}))
    feed.send(b"a" * 100)
    await step(response.content.readexactly(100))
    response.close()
    for _ in range(5):
        feed.send(b"b" * 1000)
    feed.end()
    assert await relay.app[STATE].wait_streams_closed(STEP)
    assert not upstream.disconnected.is_set()
    assert upstream.written == 5100
    assert relay.metric("relay_streams_total", model="-", outcome="drained") == 1


async def test_drain_stops_at_its_byte_cap(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A drain past drain_max_bytes closes the upstream and is recorded as client_closed."""
    relay = await make_relay(
        routes=(tts_route(upstream, on_disconnect="drain", drain_max_bytes=1500),)
    )
    feed = upstream.stream("audio/mpeg")
    response = await step(relay.client.post("/tts/text-to-speech/stream", json={"text": "x"}))
    feed.send(b"a" * 10)
    await step(response.content.readexactly(10))
    response.close()
    for _ in range(5000):
        feed.send(b"b" * 1000)
    await step(upstream.disconnected.wait())
    assert await relay.app[STATE].wait_streams_closed(STEP)
    assert relay.metric("relay_streams_total", model="-", outcome="client_closed") == 1


async def test_cancel_policy_closes_the_upstream(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """The default on_disconnect=cancel closes the upstream when the client leaves."""
    relay = await make_relay(routes=(tts_route(upstream),))
    feed = upstream.stream("audio/mpeg")
    response = await step(relay.client.post("/tts/text-to-speech/stream", json={"text": "x"}))
    feed.send(b"a")
    await step(response.content.readexactly(1))
    response.close()
    await step(upstream.disconnected.wait())


async def _read_until(response: aiohttp.ClientResponse, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        data += await response.content.readany()
    return data


async def test_heartbeats_only_between_events(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """Keep-alive comments appear while the stream is idle at a boundary, never mid-event."""
    relay = await make_relay(routes=(llm_route(upstream, sse_heartbeat=0.05),))
    feed = upstream.stream(SSE)
    response = await step(relay.client.post("/v1/chat/completions", json={"model": "anthropic/x"}))
    feed.send(b"data: one\n\n")
    data = await step(_read_until(response, b": keep-alive\n\n"))
    assert data.startswith(b"data: one\n\n: keep-alive\n\n")
    feed.send(b"data: par")
    await step(_read_until(response, b"data: par"))
    # Several heartbeat periods pass mid-event; that nothing is inserted is the point.
    await asyncio.sleep(0.3)
    feed.send(b"tial\n\n")
    feed.end()
    rest = await read_all(response)
    assert rest.startswith(b"tial\n\n")
    assert b"data: par" + rest[:6] == b"data: partial\n\n"


async def test_heartbeats_never_enter_audio(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A heartbeat route relays non-SSE bodies byte for byte, however long they idle."""
    relay = await make_relay(routes=(tts_route(upstream, sse_heartbeat=0.05),))
    feed = upstream.stream("audio/mpeg")
    response = await step(relay.client.post("/tts/text-to-speech/stream", json={"text": "x"}))
    feed.send(b"\x00\x01")
    await step(response.content.readexactly(2))
    # Idle for several heartbeat periods: nothing may be written into the audio.
    await asyncio.sleep(0.3)
    feed.send(b"\x02")
    feed.end()
    assert await read_all(response) == b"\x02"


async def test_no_heartbeat_while_the_client_is_not_reading() -> None:
    """A heartbeat that falls due while the client's transport is full is skipped, not
    queued behind the events the client has yet to read; the next one goes out."""
    written: list[bytes] = []
    forward = SimpleNamespace(write=lambda data: written.append(data) or True)
    upstream = SimpleNamespace(needs_drain=True)  # the forwarder paused it: client full
    exchange = Exchange(request_id="r", client="c", started=0.0)
    watchdog = SimpleNamespace(last=0.0)
    every = 0.0  # always due; the test fires the timer's callback itself
    heartbeat = Heartbeat(every, forward, upstream, SseTap(), exchange, watchdog)  # type: ignore[arg-type]
    heartbeat.stop()
    try:
        heartbeat._beat()
        heartbeat.stop()
        assert written == []
        upstream.needs_drain = False  # the client drained
        heartbeat._beat()
        assert written == [HEARTBEAT]
        assert exchange.heartbeats == 1
    finally:
        heartbeat.stop()


def test_routes_from_toml_with_every_problem_named(tmp_path: Path) -> None:
    """check-config reports each bad route field by its table index and name."""
    file = tmp_path / "relay.toml"
    file.write_text(
        """
[[routes]]
name = "llm"
prefix = "/v1"
upstream = "https://llm.example/v1"
key_env = "LLM_KEY"
allowed_models = ["openai/gpt-4o-mini"]
paths = ["/chat/completions"]

[[routes]]
name = "Bad Name"
prefix = "/api/v3"
upstream = "ftp://x"
key_env = "MISSING"
model_from = "header"
paths = ["no-slash"]
on_disconnect = "maybe"
sse_heartbeat = -1
colour = "red"
"""
    )
    env = {"WAVESPEED_API_KEY": FAKE_KEY, "LLM_KEY": LLM_KEY}
    with pytest.raises(ConfigError) as error:
        load_config(file, env)
    named = {p.split(":")[0] for p in error.value.problems}
    assert named == {
        "routes[1].colour", "routes[1].name", "routes[1].prefix", "routes[1].upstream",
        "routes[1].key_env", "routes[1].model_from", "routes[1].paths",
        "routes[1].on_disconnect", "routes[1].sse_heartbeat",
    }  # fmt: skip
    assert LLM_KEY not in str(error.value)
    file.write_text(file.read_text().split('[[routes]]\nname = "Bad')[0])
    config = load_config(file, env)
    (route,) = config.routes
    assert (route.name, route.auth_value) == ("llm", f"Bearer {LLM_KEY}")
    assert LLM_KEY not in repr(config)
    assert LLM_KEY not in json.dumps(config.redacted())


def test_route_form_field_scanner_handles_any_position() -> None:
    """The multipart scanner finds a field before or after a large file part, bounded."""
    from relay.forms import form_field

    big = os.urandom(300_000)
    for body in (_multipart("zz", big, "m-1"), _multipart("zz", b"", "m-2")):
        assert form_field(io.BytesIO(body), "zz", "model") in ("m-1", "m-2")
    assert form_field(io.BytesIO(_multipart("zz", big, "m")), "zz", "absent") is None
    assert form_field(io.BytesIO(_multipart("zz", big, "x" * 5000)), "zz", "model") is None


async def test_access_control_applies_to_routes(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """Origins and credentials are enforced on configured routes before the upstream."""
    relay = await make_relay(
        routes=(llm_route(upstream),), client_auth=frozenset({"token"}), token_secret="s" * 40
    )
    response = await relay.client.post("/v1/chat/completions", json={"model": "anthropic/x"})
    assert response.status == 401
    foreign = await relay.client.post(
        "/v1/chat/completions",
        json={"model": "anthropic/x"},
        headers={"Origin": "https://evil.example"},
    )
    assert foreign.status == 403
    assert not upstream.seen


async def test_route_handler_is_not_confused_by_wavespeed_paths(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """The WaveSpeed routes keep working next to configured ones, with their own key."""
    relay: Relay = await make_relay(routes=(llm_route(upstream),))
    upstream.respond(200, b"{}")
    response = await relay.client.post("/api/v3/wavespeed-ai/any-llm/stream", data=b"{}")
    assert response.status == 200
    assert upstream.seen[0].headers["authorization"] == [f"Bearer {FAKE_KEY}"]


async def test_configured_routes_take_stream_slots(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """RELAY_MAX_STREAMS_PER_CLIENT holds on configured routes too, and frees at the end."""
    relay = await make_relay(routes=(tts_route(upstream),), max_streams_per_client=1)
    feed = upstream.stream("audio/mpeg")
    first = await step(relay.client.post("/tts/text-to-speech/stream", json={"text": "x"}))
    busy = await relay.client.post("/tts/text-to-speech/stream", json={"text": "y"})
    assert busy.status == 429
    feed.end()
    await read_all(first)
    assert await relay.app[STATE].wait_streams_closed(STEP)
    upstream.respond(200, b"ok", {"Content-Type": "audio/mpeg"})
    assert (await relay.client.post("/tts/text-to-speech/stream", json={"text": "z"})).status == 200


async def test_drain_survives_a_failed_write(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """When the client is gone mid-write, the drain still reads the upstream to its end."""
    relay = await make_relay(routes=(tts_route(upstream, on_disconnect="drain"),))
    feed = upstream.stream("audio/mpeg")
    for _ in range(400):  # far more than the socket buffers hold: the relay is mid-write
        feed.send(b"w" * 65536)
    response = await step(relay.client.post("/tts/text-to-speech/stream", json={"text": "x"}))
    await step(response.content.readexactly(65536))
    response.close()
    feed.end()
    assert await relay.app[STATE].wait_streams_closed(STEP)
    assert upstream.written == 400 * 65536
    assert relay.metric("relay_streams_total", model="-", outcome="drained") == 1


async def test_heartbeats_do_not_hold_off_the_idle_timeout(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A silent upstream is still cut at RELAY_IDLE_TIMEOUT, heartbeats or not."""
    relay = await make_relay(routes=(llm_route(upstream, sse_heartbeat=0.05),), idle_timeout=0.4)
    feed = upstream.stream(SSE)
    response = await step(relay.client.post("/v1/chat/completions", json={"model": "anthropic/x"}))
    feed.send(b"data: one\n\n")
    await step(_read_until(response, b": keep-alive\n\n"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await step(response.content.read())
    await step(upstream.disconnected.wait())
    assert await relay.app[STATE].wait_streams_closed(STEP)
    assert relay.metric("relay_streams_total", model="anthropic/*", outcome="idle_timeout") == 1


@pytest.mark.parametrize(
    ("upstream", "auth_header", "origin", "base_path", "auth"),
    [
        (
            "http://up:8080",
            "Authorization",
            "http://up:8080",
            "",
            ("Authorization", "Bearer sk-route-key"),
        ),
        ("https://up/v1", "x-api-key", "https://up", "/v1", ("x-api-key", "sk-route-key")),
        (
            "https://up/a/b%2Fc/",
            "authorization",
            "https://up",
            "/a/b%2Fc",
            ("authorization", "Bearer sk-route-key"),
        ),
    ],
)
def test_a_routes_endpoint_is_its_upstream_worked_out_once(
    upstream: str, auth_header: str, origin: str, base_path: str, auth: tuple[str, str]
) -> None:
    """The pool key and Host come from the origin; the base path goes before each request's
    path as written (encoded); the key goes in the route's field, as a bearer token in
    Authorization."""
    route = Route(
        name="r", prefix="/r", upstream=upstream, key="sk-route-key", auth_header=auth_header
    )
    endpoint = Endpoint.of(route)
    assert str(endpoint.origin.origin()) == origin
    assert endpoint.base_path == base_path
    assert endpoint.auth == auth
    assert "sk-route-key" not in repr(endpoint)  # a log of it never shows the key
