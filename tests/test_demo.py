"""The mock upstream's shapes, the demo's wiring, and ``relay demo`` as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from relay import demo
from relay.app import create_app
from relay.config import DEFAULT_MODELS, Config
from relay.mock_upstream import (
    ANSWER,
    POLLS_TO_COMPLETE,
    SAMPLE_RATE,
    audio_chunks,
    create_mock_app,
    pacing,
    speech_pcm,
)
from tests.conftest import FAKE_KEY, STEP, RelayServer, make_config, read_all, step

AUTH = {"Authorization": f"Bearer {FAKE_KEY}"}
NO_PACING = {"delay": "0"}

MockClient = TestClient[web.Request, web.Application]


@pytest.fixture
async def mock() -> AsyncIterator[MockClient]:
    client = TestClient(TestServer(create_mock_app(FAKE_KEY), host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


def sse_data(body: bytes) -> list[str]:
    """The data of each event of an SSE body, in order."""
    events = body.decode().split("\n\n")
    assert events[-1] == "", "the body ends with a complete event"
    return [event.removeprefix("data: ") for event in events[:-1]]


async def post(client: MockClient, path: str, body: object = None, **query: str) -> bytes:
    response = await client.post(path, json=body or {}, headers=AUTH, params=query or NO_PACING)
    assert response.status == 200, await response.text()
    return await read_all(response)


# --- the mock upstream's shapes -------------------------------------------------------


async def test_mock_llm_stream_is_openai_deltas_ending_in_done(mock: MockClient) -> None:
    """any-llm streams ``choices[0].delta.content`` chunks that join to the answer, then [DONE]."""
    response = await mock.post(
        "/api/v3/wavespeed-ai/any-llm/stream", json={"prompt": "hi"}, headers=AUTH, params=NO_PACING
    )
    assert response.content_type == "text/event-stream"
    data = sse_data(await read_all(response))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d)["choices"][0] for d in data[:-1]]
    assert "".join(c["delta"].get("content", "") for c in chunks) == ANSWER
    assert chunks[-1]["finish_reason"] == "stop"


async def test_mock_speech_stream_carries_hex_pcm_then_a_final_status(mock: MockClient) -> None:
    """MiniMax speech events carry hex PCM chunks (status 1) that join to the audio, then status 2."""
    events = [
        json.loads(d) for d in sse_data(await post(mock, "/api/v3/minimax/speech-02-hd/stream"))
    ]
    *chunks, final = events
    assert {e["data"]["status"] for e in chunks} == {1}
    audio = b"".join(bytes.fromhex(e["data"]["audio"]) for e in chunks)
    assert audio == speech_pcm()
    assert len(audio) % 2 == 0
    assert any(audio)
    assert final["data"]["status"] == 2
    assert final["base_resp"]["status_code"] == 0
    assert final["extra_info"]["audio_sample_rate"] == SAMPLE_RATE
    assert final["extra_info"]["audio_size"] == len(audio)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v3/acme/video-model/stream", {"prompt": "p"}),
        ("/api/v3/minimax/music-02", {"prompt": "p", "stream": True}),
    ],
)
async def test_mock_progress_events_rise_to_complete(
    mock: MockClient, path: str, body: dict[str, object]
) -> None:
    """Progress streams (``/stream`` or ``"stream": true``) rise in percentage, then ``complete``."""
    *progress, complete = [json.loads(d) for d in sse_data(await post(mock, path, body))]
    percentages = [e["percentage"] for e in progress]
    assert {e["type"] for e in progress} == {"progress"}
    assert percentages == sorted(set(percentages))
    assert percentages[0] == 0
    assert percentages[-1] < 100
    assert complete["type"] == "complete"
    assert complete["outputs"]


async def test_mock_raw_audio_bodies(mock: MockClient) -> None:
    """``?format=mp3`` answers raw audio/mpeg bytes; ``?format=wav`` a WAV of the speech PCM."""
    for fmt, content_type in (("mp3", "audio/mpeg"), ("wav", "audio/wav")):
        response = await mock.post(
            "/api/v3/minimax/speech-02-hd/stream",
            json={},
            headers=AUTH,
            params={"format": fmt, "delay": "0"},
        )
        assert response.content_type == content_type
        assert await read_all(response) == b"".join(audio_chunks(fmt))
    wav = b"".join(audio_chunks("wav"))
    assert wav[:4] == b"RIFF"
    assert wav[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", wav[24:28])[0] == SAMPLE_RATE
    assert wav[44:] == speech_pcm()


async def test_mock_task_submission_then_polling(mock: MockClient) -> None:
    """A submitted task is ``created``, polls ``processing``, then ``completed`` with outputs."""
    submitted = json.loads(await post(mock, "/api/v3/acme/image-model", {"prompt": "a cat"}))
    assert submitted["code"] == 200
    assert submitted["message"] == "success"
    task = submitted["data"]
    assert task["status"] == "created"
    assert task["outputs"] == []
    assert task["urls"]["get"].endswith(f"/api/v3/predictions/{task['id']}/result")
    statuses = []
    for path in ("", "/result")[:POLLS_TO_COMPLETE]:
        response = await mock.get(f"/api/v3/predictions/{task['id']}{path}", headers=AUTH)
        envelope = await response.json()
        assert envelope["code"] == 200
        statuses.append(envelope["data"]["status"])
    assert statuses == ["processing", "completed"]
    assert envelope["data"]["outputs"] == [f"https://example.invalid/{task['id']}.png"]


async def test_mock_unknown_prediction_is_a_404_envelope(mock: MockClient) -> None:
    """Polling an id the mock never issued answers 404 in the envelope."""
    response = await mock.get("/api/v3/predictions/nope/result", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["code"] == 404


async def test_mock_task_fails_on_request(mock: MockClient) -> None:
    """A task submitted with ``?fail=task`` ends ``failed`` with an error message."""
    task = json.loads(await post(mock, "/api/v3/acme/image-model", {}, fail="task"))["data"]
    envelopes = [
        await (await mock.get(f"/api/v3/predictions/{task['id']}", headers=AUTH)).json()
        for _ in range(POLLS_TO_COMPLETE)
    ]
    assert envelopes[-1]["data"]["status"] == "failed"
    assert envelopes[-1]["data"]["error"]


@pytest.mark.parametrize(
    ("fail", "status"), [("1", 500), ("429", 429), ("400", 400), ("503", 503), ("999", 500)]
)
async def test_mock_fails_on_request(mock: MockClient, fail: str, status: int) -> None:
    """``?fail=STATUS`` answers that status in WaveSpeed's envelope before any stream."""
    response = await mock.post(
        "/api/v3/wavespeed-ai/any-llm/stream", json={}, headers=AUTH, params={"fail": fail}
    )
    assert response.status == status
    envelope = await response.json()
    assert envelope["code"] == status
    assert "requested" in envelope["message"]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {FAKE_KEY}"])
async def test_mock_checks_the_key(mock: MockClient, auth: str | None) -> None:
    """Without the expected bearer key the mock answers 401, as the real API does."""
    headers = {"Authorization": auth} if auth else {}
    response = await mock.post("/api/v3/wavespeed-ai/any-llm/stream", json={}, headers=headers)
    assert response.status == 401
    assert (await response.json())["code"] == 401


async def test_mock_cut_drops_the_connection_mid_stream(mock: MockClient) -> None:
    """``?cut=N`` ends the body after N events without a terminating chunk: the reader errors."""
    response = await mock.post(
        "/api/v3/wavespeed-ai/any-llm/stream",
        json={},
        headers=AUTH,
        params={"cut": "2", "delay": "0"},
    )
    received = bytearray()

    async def read_until_error() -> None:
        async for chunk in response.content.iter_any():
            received.extend(chunk)

    with pytest.raises(aiohttp.ClientPayloadError):
        await step(read_until_error())
    assert received.count(b"\n\n") == 2


@pytest.mark.parametrize(
    ("query", "shape", "expected"),
    [
        ({}, "llm", (0.4, 0.045)),
        ({"delay": "0"}, "llm", (0.0, 0.0)),
        ({"delay": "0.01"}, "speech", (0.01, 0.01)),
        ({"delay": "0", "ttfb": "0.2"}, "progress", (0.2, 0.0)),
        ({"ttfb": "0"}, "audio", (0.0, 0.05)),
        ({"delay": "-1"}, "llm", (0.0, 0.0)),
        ({"delay": "soon"}, "llm", (0.045, 0.045)),
    ],
)
def test_mock_pacing(query: dict[str, str], shape: str, expected: tuple[float, float]) -> None:
    """The pause before the first event and between events: per shape, or from the query."""
    assert pacing(query, shape) == expected


# --- the demo's wiring ----------------------------------------------------------------


@pytest.fixture
async def demo_relay(mock: MockClient) -> AsyncIterator[MockClient]:
    """The relay with the demo page in front of the mock, as ``relay demo`` builds it."""
    mock_url = str(mock.make_url("")).rstrip("/")
    app = create_app(make_config(mock_url, allowed_models=DEFAULT_MODELS), pages=demo.pages())
    client = TestClient(RelayServer(app, host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


async def test_demo_page_and_assets_are_served(demo_relay: MockClient) -> None:
    """The relay's public listener serves the page at ``/`` and its script and style sheet."""
    page = await demo_relay.get("/")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        response = await demo_relay.get(asset)
        assert response.status == 200, asset
        assert FAKE_KEY not in await response.text()
    assert {"/static/demo.js", "/static/demo.css"} <= set(re.findall(r'"(/static/[^"]+)"', html))
    assert FAKE_KEY not in html


async def test_demo_page_uses_only_relayed_models(demo_relay: MockClient) -> None:
    """Every path the page's script calls is a relayed route for a default-allowlist model."""
    script = await (await demo_relay.get("/static/demo.js")).text()
    paths = re.findall(r'"(/api/v3/[^"]+)"', script)
    assert len(paths) == 3
    for path in paths:
        model = path.removeprefix("/api/v3/").removesuffix("/stream")
        assert model in DEFAULT_MODELS, path


async def test_demo_streams_through_the_relay(demo_relay: MockClient) -> None:
    """Behind the page, the relay injects the key and streams the mock's answer unchanged."""
    response = await demo_relay.post(
        "/api/v3/wavespeed-ai/any-llm/stream", json={"prompt": "hi"}, params=NO_PACING
    )
    assert response.status == 200
    data = sse_data(await read_all(response))
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])
    assert text == ANSWER


async def test_demo_pages_leave_the_relay_routes_alone(demo_relay: MockClient) -> None:
    """Paths outside the page and its assets still get the relay's own envelope errors."""
    missing = await demo_relay.get("/static/nope.js")
    assert missing.status == 404
    response = await demo_relay.post("/api/v3/acme/not-allowed/stream", json={})
    assert response.status == 403
    assert (await response.json())["data"]["error"] == "model_not_allowed"


def test_demo_config_takes_only_local_settings_from_the_environment() -> None:
    """The demo honours RELAY_PORT and a few local settings, but keeps its own host, allowlist, auth, key and upstream."""
    environ = {
        "RELAY_PORT": "8123",
        "RELAY_HOST": "0.0.0.0",
        "RELAY_ALLOWED_MODELS": "acme/only",
        "RELAY_UPSTREAM_URL": "https://api.wavespeed.ai",
        "WAVESPEED_API_KEY": "sk-real-key-must-not-be-used",
        "RELAY_LOG_LEVEL": "warning",
        "RELAY_CLIENT_AUTH": "token",
        "RELAY_RATE_LIMIT": "600/minute",
    }
    config = demo.demo_config(environ, None, "demo-generated")
    assert (config.host, config.port, config.admin_port) == ("127.0.0.1", 8123, 0)
    assert config.api_key == "demo-generated"
    assert config.allowed_models == DEFAULT_MODELS
    assert config.client_auth == Config().client_auth  # anonymous, on loopback only
    assert (
        config.rate_limit
        == demo.demo_config({"RELAY_RATE_LIMIT": "600/minute"}, None, "k").rate_limit
    )
    assert config.log_level == "warning"
    assert config.shutdown_grace == 1.0
    assert demo.demo_config(environ, "9000", "k").port == 9000  # --port beats RELAY_PORT


# --- `relay demo` as a user runs it ---------------------------------------------------


async def test_relay_demo_command_serves_the_page_and_stops_on_ctrl_c() -> None:
    """``relay demo`` prints the page URL, streams through the relay, and exits 0 on SIGINT."""
    environ = {"PATH": os.environ["PATH"], "RELAY_PORT": "0", "RELAY_LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "demo",
        env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    output: list[str] = []
    try:
        while not (match := re.search(r"Demo page:\s+(\S+)", "".join(output))):
            line = (await step(proc.stdout.readline())).decode()
            assert line, "relay demo exited: " + "".join(output)
            output.append(line)
        url = match.group(1)
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as page:
                assert page.status == 200
                assert "demo.js" in await page.text()
            stream = url + "api/v3/wavespeed-ai/any-llm/stream?delay=0"
            async with session.post(stream, json={"prompt": "hi"}) as response:
                assert response.status == 200
                assert sse_data(await read_all(response))[-1] == "[DONE]"
        proc.send_signal(signal.SIGINT)
        output.append((await step(proc.stdout.read())).decode())
        assert await step(proc.wait()) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), STEP)
    text = "".join(output)
    assert "relay_stopped" in text
    assert not re.search(r"demo-[A-Za-z0-9_-]{20}", text), "the generated key was printed"
