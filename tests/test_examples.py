"""The README's route examples work as written, against the built-in mock upstream."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from relay.config import load_config
from relay.mock_upstream import create_mock_app
from tests.conftest import STEP, require_program
from tests.test_cli import relay_process

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = ROOT / "examples" / "routes.toml"
LOCAL = ROOT / "examples" / "routes-local.toml"
ENV = {"WAVESPEED_API_KEY": "local", "GATEWAY_KEY": "local", "TTS_API_KEY": "local"}


def _without_upstreams(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return [line for line in lines if not line.startswith("upstream = ")]


def test_both_example_files_load_and_differ_only_in_upstreams() -> None:
    """examples/routes.toml and its local twin validate, and differ only where they point."""
    production, local = load_config(EXAMPLES, ENV), load_config(LOCAL, ENV)
    assert [r.name for r in production.routes] == ["llm", "gateway", "tts"]
    assert _without_upstreams(EXAMPLES.read_text()) == _without_upstreams(LOCAL.read_text())
    assert {r.upstream.split("/")[2] for r in local.routes} == {"127.0.0.1:8090"}


@contextlib.asynccontextmanager
async def mock_on_a_free_port() -> AsyncIterator[str]:
    server = TestServer(create_mock_app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


README_CURLS = [line for line in README.splitlines() if line.startswith("curl -N localhost:8080/")]


def test_the_readme_shows_a_command_for_each_route() -> None:
    """One curl line per example route (speech and transcription for the gateway)."""
    assert [re.search(r"localhost:8080(/\S+)", c).group(1) for c in README_CURLS] == [
        "/v1/chat/completions",
        "/gw/v1/audio/speech",
        "/gw/v1/audio/transcriptions",
        "/tts/text-to-speech/stream",
    ]


@pytest.mark.parametrize("command", README_CURLS, ids=lambda c: c.split()[2].split("8080")[1])
async def test_readme_route_commands_stream_through_the_relay(command: str, tmp_path: Path) -> None:
    """Each README curl command streams through `relay serve --config examples/routes-local.toml`."""
    curl = require_program("curl")
    async with mock_on_a_free_port() as mock_url:
        config = tmp_path / "routes.toml"
        config.write_text(LOCAL.read_text().replace("http://127.0.0.1:8090", mock_url))
        async with relay_process(mock_url, "--config", str(config), **ENV) as relay:
            argv = shlex.split(command.replace("http://", "").replace("localhost:8080", relay.url))
            argv = [a.replace("@README.md", f"@{ROOT / 'README.md'}") for a in argv]
            argv = [a if a != "hello.mp3" else str(tmp_path / "hello.mp3") for a in argv]
            proc = await asyncio.create_subprocess_exec(
                curl, "-sS", "--fail-with-body", *argv[1:], stdout=asyncio.subprocess.PIPE
            )
            output, _ = await asyncio.wait_for(proc.communicate(), STEP * 4)
            assert proc.returncode == 0, output
            if "-o" in argv:
                assert (tmp_path / "hello.mp3").stat().st_size > 0
            else:
                assert output.rstrip().endswith(b"data: [DONE]")
            relay.proc.terminate()
            assert await relay.finish() == 0
        assert '"outcome":"completed"' in relay.output
        assert "local" not in [
            line.split('"client":')[0] for line in relay.lines if "Bearer" in line
        ]
