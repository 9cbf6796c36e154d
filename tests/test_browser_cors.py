"""A page on an allowed origin streams with a relay token minted as the README shows; the
same page on another origin is refused. Real Chromium, real preflights, real origins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import BrowserContext

from relay.app import create_app
from tests.conftest import FAKE_KEY, STEP, FakeUpstream, RelayServer, make_config
from tests.test_browser import browser  # noqa: F401 - the Chromium fixture

pytestmark = pytest.mark.external

SECRET = "browser-test-secret-" + "0123456789abcdef" * 2
PAGE = """<!doctype html><meta charset="utf-8"><title>app</title><pre id="out"></pre><script>
(async () => {{
  const out = document.getElementById("out");
  try {{
    const response = await fetch({relay!r} + "/api/v3/wavespeed-ai/any-llm/stream", {{
      method: "POST",
      headers: {{ "Authorization": "Bearer " + {token!r}, "Content-Type": "application/json" }},
      body: JSON.stringify({{ prompt: "hi" }}),
    }});
    document.body.dataset.requestId = response.headers.get("X-Request-ID") || "";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {{
      const {{ done, value }} = await reader.read();
      if (done) break;
      out.textContent += decoder.decode(value, {{ stream: true }});
    }}
    document.body.dataset.state = "done";
  }} catch (error) {{
    document.body.dataset.state = "refused";
  }}
}})();
</script>"""


def mint_like_the_readme(user_id: str) -> str:
    return jwt.encode(
        {"sub": user_id, "exp": int(time.time()) + 300, "models": ["wavespeed-ai/any-llm"]},
        SECRET,
        algorithm="HS256",
    )


class PageServer:
    """Serves one page from its own loopback port, i.e. its own origin."""

    def __init__(self) -> None:
        self.html = ""
        app = web.Application()
        app.router.add_get("/", self._page)
        self.server = TestServer(app, host="127.0.0.1")

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=self.html, content_type="text/html")

    @property
    def origin(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def pages() -> AsyncIterator[tuple[PageServer, PageServer]]:
    """The app's origin and a foreign one."""
    app, foreign = PageServer(), PageServer()
    for page in (app, foreign):
        await page.server.start_server()
    yield app, foreign
    for page in (app, foreign):
        await page.server.close()


async def test_allowed_origin_streams_and_another_origin_is_refused(
    upstream: FakeUpstream,
    pages: tuple[PageServer, PageServer],
    browser: BrowserContext,  # noqa: F811 - the imported fixture
) -> None:
    """The app's origin streams through the relay with a token; a foreign origin gets nothing."""
    app_page, foreign_page = pages
    app_origin = app_page.origin
    config = make_config(
        upstream.url,
        client_auth=frozenset({"token"}),
        token_secret=SECRET,
        allowed_origins=(app_origin,),
    )
    relay = RelayServer(create_app(config), host="127.0.0.1")
    await relay.start_server()
    try:
        relay_url = str(relay.make_url("")).rstrip("/")
        app_page.html = foreign_page.html = PAGE.format(
            relay=relay_url, token=mint_like_the_readme("user-42")
        )

        feed = upstream.stream()
        page = await browser.new_page()
        await page.goto(app_origin + "/")
        await asyncio.wait_for(upstream.contacted.wait(), STEP)
        feed.send(b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n')
        await page.wait_for_function(
            "() => document.getElementById('out').textContent.includes('Hello')",
            timeout=STEP * 1000,
        )
        feed.send(b"data: [DONE]\n\n")
        feed.end()
        await page.wait_for_function(
            "() => document.body.dataset.state === 'done'", timeout=STEP * 1000
        )
        assert upstream.seen[0].headers["authorization"] == [f"Bearer {FAKE_KEY}"]  # not the token
        assert "origin" not in upstream.seen[0].headers

        seen_before = len(upstream.seen)
        other = await browser.new_page()
        await other.goto(foreign_page.origin + "/")
        await other.wait_for_function(
            "() => document.body.dataset.state === 'refused'", timeout=STEP * 1000
        )
        assert len(upstream.seen) == seen_before
        assert await other.evaluate("document.getElementById('out').textContent") == ""
    finally:
        await relay.close()
