"""Clients nobody here wrote, through the relay: the WaveSpeed SDK, requests, curl, npm's SSE parser.

Each one talks to the relay exactly as it would talk to the provider (the relay's URL as
the base URL, no provider key), and gets what the provider would have sent it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import requests
import wavespeed
from aiohttp.test_utils import TestServer

from relay.mock_upstream import create_mock_app
from tests.conftest import FAKE_KEY, STEP, FakeUpstream, RelayFactory, require_program, step

CLIENT_KEY = "client-side-key-the-relay-drops"  # what a client sends where it would send a key


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    """The built-in mock upstream, accepting only the relay's provider key."""
    server = TestServer(create_mock_app(FAKE_KEY), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# --- the official WaveSpeed SDK -------------------------------------------------------


async def test_wavespeed_sdk_runs_a_task_through_the_relay(
    make_relay: RelayFactory, mock_url: str
) -> None:
    """``wavespeed.Client(base_url=relay)`` submits a task and polls it to its outputs."""
    relay = await make_relay(upstream_url=mock_url)
    client = wavespeed.Client(
        api_key=CLIENT_KEY, base_url=relay.url, max_connection_retries=0, retry_interval=0
    )
    # The SDK is synchronous (requests + time.sleep between polls): it runs in a thread
    # while the relay and the mock serve on this loop.
    result = await step(
        asyncio.to_thread(
            client.run, "acme/text-to-image", {"prompt": "a cat"}, timeout=STEP, poll_interval=0
        )
    )
    [output] = result["outputs"]
    assert output.startswith("https://example.invalid/")
    assert output.endswith(".png")
    # The mock accepts only FAKE_KEY: the SDK's own key never reached it, the relay's did.
    task_id = output.removeprefix("https://example.invalid/").removesuffix(".png")
    record = await step(asyncio.to_thread(client.get_result, task_id))
    assert record["code"] == 200
    assert record["data"]["id"] == task_id
    assert record["data"]["status"] == "completed"
    assert record["data"]["outputs"] == [output]


async def test_wavespeed_sdk_reports_a_relay_refusal(
    make_relay: RelayFactory, mock_url: str
) -> None:
    """A model outside the allowlist fails in the SDK with the relay's envelope, no task run."""
    relay = await make_relay(upstream_url=mock_url)
    client = wavespeed.Client(api_key=CLIENT_KEY, base_url=relay.url)
    with pytest.raises(RuntimeError, match=r"HTTP 403: .*model_not_allowed"):
        await step(asyncio.to_thread(client.run, "other/model", {"prompt": "x"}, timeout=STEP))


# --- requests, as the provider's documentation shows it --------------------------------


async def test_requests_iter_lines_receives_each_event_as_it_is_sent(
    make_relay: RelayFactory, upstream: FakeUpstream
) -> None:
    """``requests.post(..., stream=True).iter_lines()`` yields each event before the next exists."""
    feed = upstream.stream()
    relay = await make_relay()
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    def consume() -> int:
        # The provider's documented Python example, pointed at the relay and without a key.
        response = requests.post(
            f"{relay.url}/api/v3/acme/video-model",
            headers={"Content-Type": "application/json"},
            json={"prompt": "Your prompt", "stream": True},
            stream=True,
            timeout=STEP,
        )
        with response:
            for line in response.iter_lines():
                if line:
                    loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)
        return response.status_code

    reader = asyncio.ensure_future(asyncio.to_thread(consume))
    events = [{"type": "progress", "percentage": p} for p in (25, 50, 75)]
    events.append({"type": "complete", "outputs": ["https://example.invalid/out.mp4"]})
    for obj in events:
        feed.send(event(obj))
        line = await step(lines.get())
        assert line is not None
        assert line.startswith(b"data: ")
        assert json.loads(line[6:]) == obj
    feed.end()
    assert await step(lines.get()) is None
    assert await step(reader) == 200
    assert upstream.seen[0].headers["authorization"] == [f"Bearer {FAKE_KEY}"]


# --- curl -N --------------------------------------------------------------------------


async def test_curl_receives_a_binary_stream_byte_identical(
    make_relay: RelayFactory, upstream: FakeUpstream
) -> None:
    """``curl -N`` gets raw audio/mpeg bytes exactly as sent, each chunk before the next exists."""
    curl = require_program("curl")
    feed = upstream.stream("audio/mpeg")
    relay = await make_relay()
    rng = random.Random(6)
    # Random bytes, plus ones that look like HTTP chunk framing and SSE: nothing is parsed.
    chunks = [rng.randbytes(rng.randint(1, 20000)) for _ in range(8)]
    chunks[3:3] = [b"0\r\n\r\n", b"\r\n\r\n", b"data: [DONE]\n\n", bytes(range(256))]
    proc = await asyncio.create_subprocess_exec(
        curl, "-N", "-sS", "--fail-with-body", "-X", "POST",
        "-H", "Content-Type: application/json", "--data", '{"text": "hello"}',
        f"{relay.url}/api/v3/minimax/speech-02-hd/stream", "-o", "-",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        for chunk in chunks:
            feed.send(chunk)
            assert await step(proc.stdout.readexactly(len(chunk))) == chunk
        feed.end()
        assert await step(proc.stdout.read()) == b""
        assert await step(proc.wait()) == 0, (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), STEP)
    assert upstream.written == sum(map(len, chunks))


# --- eventsource-parser, from npm -----------------------------------------------------

# Reads one SSE stream with fetch + eventsource-parser and prints each event as a JSON line.
SSE_SCRIPT = """
import { EventSourceParserStream } from "eventsource-parser/stream";

const response = await fetch(process.argv[2], {
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify({ prompt: "hi" }),
});
console.log(JSON.stringify({ status: response.status, type: response.headers.get("content-type") }));
const reader = response.body
  .pipeThrough(new TextDecoderStream())
  .pipeThrough(new EventSourceParserStream())
  .getReader();
for (;;) {
  const { done, value } = await reader.read();
  if (done) break;
  console.log(JSON.stringify({ event: value.event ?? null, id: value.id ?? null, data: value.data }));
}
console.log(JSON.stringify({ end: true }));
"""


@pytest.fixture(scope="session")
def sse_parser(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A script using ``eventsource-parser`` installed from npm into a temporary directory."""
    require_program("node")
    npm = require_program("npm")
    root = tmp_path_factory.mktemp("npm")
    (root / "package.json").write_text('{"private": true, "type": "module"}\n')
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "eventsource-parser@3"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        message = f"npm install eventsource-parser failed: {done.stderr.strip()[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    script = root / "read-sse.mjs"
    script.write_text(SSE_SCRIPT)
    return script


async def test_eventsource_parser_from_npm_reads_a_stream_through_the_relay(
    make_relay: RelayFactory, upstream: FakeUpstream, sse_parser: Path
) -> None:
    """npm's ``eventsource-parser`` under Node's fetch gets every event, split or not, in order."""
    node = require_program("node")
    feed = upstream.stream()
    relay = await make_relay()
    proc = await asyncio.create_subprocess_exec(
        node, str(sse_parser), f"{relay.url}/api/v3/wavespeed-ai/any-llm/stream",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None
    assert stderr is not None

    async def line() -> dict[str, object]:
        raw = await step(stdout.readline())
        assert raw, (await stderr.read()).decode()
        parsed: dict[str, object] = json.loads(raw)
        return parsed

    try:
        feed.send(b": the relay forwards comments too\n\n")
        assert await line() == {"status": 200, "type": "text/event-stream"}
        first = event({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})
        feed.send(first)
        assert await line() == {"event": None, "id": None, "data": first[6:-2].decode()}
        # One event split mid-line across chunks, with CRLF line ends, an id and a name.
        feed.send(b'id: 7\r\nevent: delta\r\ndata: {"choices":[{"delta":')
        feed.send(b'{"content":"lo"}}]}\r\n\r\n')
        assert await line() == {
            "event": "delta",
            "id": "7",
            "data": '{"choices":[{"delta":{"content":"lo"}}]}',
        }
        feed.send(b"data: [DONE]\n\n")
        assert await line() == {"event": None, "id": None, "data": "[DONE]"}
        feed.end()
        assert await line() == {"end": True}
        assert await step(proc.wait()) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), STEP)
