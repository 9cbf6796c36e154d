"""The demo page in a real browser (Debian's Chromium, driven by Playwright) through the relay.

The page is served by a relay in front of the scriptable fake upstream, so the test decides
when each event exists: what the page shows before the next event is sent was streamed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import BrowserContext, Page, Request, async_playwright

from relay import demo
from relay.app import create_app
from relay.mock_upstream import SPEECH_CHUNK_SAMPLES, speech_pcm
from tests.conftest import (
    FAKE_KEY,
    STEP,
    FakeUpstream,
    Feed,
    RelayServer,
    make_config,
    require_program,
)

pytestmark = pytest.mark.external

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# What Chromium needs on a closed network: no sandbox as root, no GPU, and none of its
# background connections to Google (refused here, and slow to fail).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = STEP * 1000

LLM = "/api/v3/wavespeed-ai/any-llm/stream"
TASK = "/api/v3/minimax/music-02"
SPEECH = "/api/v3/minimax/speech-02-hd/stream"


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def delta(text: str) -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}}]})


def speech_chunk(n: int) -> bytes:
    size = SPEECH_CHUNK_SAMPLES * 2
    return event({"data": {"audio": speech_pcm()[n * size : (n + 1) * size].hex(), "status": 1}})


SPEECH_FINAL = event(
    {
        "data": {"audio": "", "status": 2},
        "extra_info": {"audio_format": "pcm", "audio_sample_rate": 16000},
        "base_resp": {"status_code": 0, "status_msg": "success"},
    }
)


@dataclass
class Streams:
    """One feed per stream the page opens, and the page's own URL."""

    llm: Feed
    task: Feed
    speech: Feed
    url: str


@pytest.fixture
async def streams(upstream: FakeUpstream) -> AsyncIterator[Streams]:
    """The demo page served by a relay whose upstream streams only what the test feeds."""
    handlers = {}
    feeds = []
    for path in (LLM, TASK, SPEECH):
        feeds.append(upstream.stream())
        handlers[path] = upstream.handler

    async def route(request: web.Request) -> web.StreamResponse:
        handler = handlers[request.path]
        assert handler is not None
        return await handler(request)

    upstream.handler = route
    config = make_config(upstream.url, allowed_models=("wavespeed-ai/any-llm", "minimax/*"))
    server = RelayServer(create_app(config, pages=demo.pages()), host="127.0.0.1")
    await server.start_server()
    yield Streams(*feeds, url=str(server.make_url("/")))
    await server.close()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """Headless Chromium with a fresh profile; never a downloaded browser."""
    chromium = require_program("chromium")
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1040, "height": 900},
        )
        try:
            yield context
        finally:
            await context.close()


async def wait_until(page: Page, expression: str, arg: object = None) -> None:
    """Wait (bounded) until a JavaScript expression holds in the page."""
    await page.wait_for_function(expression, arg=arg, timeout=WAIT_MS)


def text_is(selector: str) -> str:
    return f"(want) => document.querySelector({selector!r}).textContent === want"


def progress_is(value: int) -> str:
    return f"() => document.getElementById('progress').getAttribute('aria-valuenow') === '{value}'"


def state_is(section: str, state: str) -> str:
    return f"() => document.getElementById({section!r}).dataset.state === {state!r}"


async def open_page(browser: BrowserContext, url: str) -> tuple[Page, list[Request]]:
    page = await browser.new_page()
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request))
    await page.goto(url)
    return page, requests


async def test_page_streams_through_the_relay_without_the_key(
    browser: BrowserContext, streams: Streams, upstream: FakeUpstream
) -> None:
    """The answer grows token by token, the bar follows progress, audio arrives; no key in sight."""
    page, requests = await open_page(browser, streams.url)
    await page.click("#run")

    # The answer: each token is on screen before the upstream has produced the next one.
    tokens = ["Bytes", " flow", " through", " unchanged."]
    shown = []
    for n, token in enumerate(tokens):
        streams.llm.send(delta(token))
        await wait_until(page, text_is("#answer"), "".join(tokens[: n + 1]))
        shown.append(await page.inner_text("#answer"))
        assert await page.get_attribute("#llm", "data-state") == "streaming"
    assert shown == ["Bytes", "Bytes flow", "Bytes flow through", "Bytes flow through unchanged."]
    streams.llm.send(b"data: [DONE]\n\n")
    streams.llm.end()
    await wait_until(page, state_is("llm", "done"))

    # The progress bar follows each progress event as it arrives.
    for percentage in (10, 25, 60):  # not 0: the bar starts at 0, so its wait would return at once
        streams.task.send(event({"type": "progress", "percentage": percentage}))
        await wait_until(page, progress_is(percentage))
    streams.task.send(event({"type": "complete", "outputs": ["https://example.invalid/a.mp3"]}))
    streams.task.end()
    await wait_until(page, state_is("task", "done"))
    assert await page.get_attribute("#progress", "aria-valuenow") == "100"

    # Speech: each hex PCM chunk is decoded and counted as it arrives.
    for n in range(3):
        streams.speech.send(speech_chunk(n))
        await wait_until(
            page, "(want) => document.getElementById('speech-status').textContent.startsWith(want)",
            f"{(n + 1) / 10:.1f} s of audio received",
        )  # fmt: skip
    streams.speech.send(SPEECH_FINAL)
    streams.speech.end()
    await wait_until(page, state_is("speech", "done"))

    # The figures table: one row per stream, each with a first-byte time and its chunks.
    rows = await page.eval_on_selector_all(
        "#figures-body tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    assert [row[0] for row in rows] == ["any-llm answer", "music-02 progress", "speech-02-hd audio"]
    assert [row[1] for row in rows] == ["done"] * 3
    assert all(row[2].endswith(" ms") and int(row[3]) >= 4 and row[6] for row in rows)

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

    # The key: injected upstream on every request, and nowhere the browser can see it.
    assert len(upstream.seen) == 3
    assert all(seen.headers["authorization"] == [f"Bearer {FAKE_KEY}"] for seen in upstream.seen)
    assert FAKE_KEY not in await page.content()
    origin = streams.url.rstrip("/")
    assert {r.url for r in requests if r.method == "POST"} == {
        origin + p for p in (LLM, TASK, SPEECH)
    }
    for request in requests:
        assert request.url.startswith(origin), request.url
        headers = await request.all_headers()
        assert "authorization" not in headers
        assert FAKE_KEY not in json.dumps(headers) + request.url + (request.post_data or "")


async def test_page_reports_a_cut_stream_as_an_error(
    browser: BrowserContext, streams: Streams
) -> None:
    """A stream the upstream cuts mid-answer shows as an error, never as a finished answer."""
    page, _ = await open_page(browser, streams.url)
    await page.click("#run")
    streams.llm.send(delta("Half an"))
    await wait_until(page, text_is("#answer"), "Half an")
    streams.llm.abort()
    await wait_until(page, state_is("llm", "error"))
    assert await page.inner_text("#answer") == "Half an"
    status = "#figures-body tr[data-stream='any-llm answer'] td:nth-child(2)"
    assert (await page.inner_text(status)).startswith("✗")
    for feed in (streams.task, streams.speech):
        feed.end()
