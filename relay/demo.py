"""``relay demo``: the relay in front of the built-in mock upstream, with a page to watch it.

The relay listens on ``RELAY_PORT`` (loopback only, anonymous), the mock upstream on a free
loopback port behind it, and the provider key is generated for this run: it lives in the
relay and the mock, never in the page. The page (``relay/static``) is served by the relay's
public listener before its catch-all, so it is same-origin with the relayed routes.

Only the settings that make sense for a local demo are read from the environment
(``DEMO_SETTINGS``); the upstream, the allowlist and the key are the demo's own.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from relay import log, server
from relay.app import create_app
from relay.config import Config, ConfigError, load_config
from relay.mock_upstream import create_mock_app

STATIC_DIR = Path(__file__).parent / "static"
DEMO_SETTINGS = (
    "RELAY_PORT",
    "RELAY_ADMIN_PORT",
    "RELAY_LOG_LEVEL",
    "RELAY_LOG_FORMAT",
    "RELAY_SHUTDOWN_GRACE",
    "RELAY_RATE_LIMIT",
    "RELAY_MAX_STREAMS_PER_CLIENT",
)
# Ctrl-C should end the demo at once, not wait a minute for a stream the page left open;
# the admin listener takes any free port so the demo never collides with a running relay.
DEMO_DEFAULTS = {
    "RELAY_SHUTDOWN_GRACE": "1",
    "RELAY_ADMIN_PORT": "0",
    "RELAY_LOG_FORMAT": "console",
}


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def pages() -> list[web.AbstractRouteDef]:
    """The demo page at ``/`` and its assets under ``/static``, for ``create_app(pages=...)``."""
    return [web.get("/", _index), web.static("/static", STATIC_DIR)]


def demo_config(environ: Mapping[str, str], port: str | None, key: str) -> Config:
    """The relay's configuration for the demo (the upstream is filled in once it listens)."""
    env = {**DEMO_DEFAULTS, **{k: v for k, v in environ.items() if k in DEMO_SETTINGS}}
    env["WAVESPEED_API_KEY"] = key
    overrides: dict[str, Any] = {"port": port, "host": "127.0.0.1"}
    return load_config(None, env, overrides)


def main(port: str | None, environ: Mapping[str, str]) -> int:
    """Run the demo until Ctrl-C (or SIGTERM); 2 on bad configuration."""
    key = "demo-" + secrets.token_urlsafe(24)
    try:
        config = demo_config(environ, port, key)
    except ConfigError as exc:
        print("relay demo: bad configuration:", *exc.problems, sep="\n  - ", file=sys.stderr)
        return 2
    log.configure(config.log_level, config.log_format, secrets=[key])
    server.run(lambda: run(config))
    return 0


async def run(config: Config) -> None:
    """Serve the mock upstream and, in front of it, the relay with the demo page."""
    mock = web.AppRunner(create_mock_app(config.api_key), access_log=None)
    await mock.setup()
    try:
        await web.TCPSite(mock, "127.0.0.1", 0).start()
        host, mock_port = mock.addresses[0][:2]
        config = replace(config, upstream_url=f"http://{host}:{mock_port}")
        app = create_app(config, pages=pages())
        await server.serve(config, app=app, on_ready=_announce(config.upstream_url))
    finally:
        await mock.cleanup()


def _announce(mock_url: str) -> Callable[[str, str], None]:
    def ready(url: str, admin_url: str) -> None:
        print(
            f"\nwavespeed-relay demo\n"
            f"  Demo page:      {url}/\n"
            f"  Relay:          {url}/api/v3/...  (in front of a mock upstream at {mock_url})\n"
            f"  Metrics:        {admin_url}/metrics\n"
            f"  Try a stream:   curl -N -X POST {url}/api/v3/wavespeed-ai/any-llm/stream"
            " -H 'Content-Type: application/json' -d '{\"prompt\": \"hi\"}'\n"
            f"Ctrl-C stops.\n",
            flush=True,
        )

    return ready
