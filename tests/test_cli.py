"""The ``relay`` command as a user runs it: a subprocess, real ports, curl, signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

from relay import speedups
from tests.conftest import FAKE_KEY, STEP, FakeUpstream, read_all, require_program, step

STREAM = "/api/v3/wavespeed-ai/any-llm/stream"


class RelayProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.url = self.admin_url = ""
        self.start: dict = {}

    async def started(self) -> None:
        while True:
            record = await self.record()
            if record.get("event") == "relay_started":
                self.url, self.admin_url = record["url"], record["admin_url"]
                self.start = record
                return

    async def record(self) -> dict:
        assert self.proc.stdout is not None
        line = (await step(self.proc.stdout.readline())).decode()
        assert line, "the relay exited: " + "".join(self.lines)
        self.lines.append(line)
        return json.loads(line)

    async def finish(self) -> int:
        assert self.proc.stdout is not None
        rest = await step(self.proc.stdout.read())
        self.lines.extend(rest.decode().splitlines(keepends=True))
        return await step(self.proc.wait())

    @property
    def output(self) -> str:
        return "".join(self.lines)


@contextlib.asynccontextmanager
async def relay_process(upstream_url: str, *args: str, **env: str) -> AsyncIterator[RelayProcess]:
    environ = {
        "PATH": os.environ["PATH"],
        "WAVESPEED_API_KEY": FAKE_KEY,
        "RELAY_UPSTREAM_URL": upstream_url,
        "RELAY_PORT": "0",
        "RELAY_ADMIN_PORT": "0",
        "RELAY_ALLOWED_MODELS": "wavespeed-ai/any-llm",
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", *args,
        env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    process = RelayProcess(proc)
    try:
        await process.started()
        yield process
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_curl_streams_through_relay_serve(upstream: FakeUpstream) -> None:
    """The README's curl -N example: each event reaches curl before the next is produced."""
    curl = require_program("curl")
    feed = upstream.stream()
    async with relay_process(upstream.url) as relay:
        proc = await asyncio.create_subprocess_exec(
            curl, "-sN", "-X", "POST", relay.url + STREAM,
            "-H", "Content-Type: application/json", "-d", '{"prompt": "hi"}',
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        for i in range(5):
            event = b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % i
            feed.send(event)
            assert await step(proc.stdout.readexactly(len(event))) == event
        feed.send(b"data: [DONE]\n\n")
        feed.end()
        assert await step(proc.stdout.read()) == b"data: [DONE]\n\n"
        assert await step(proc.wait()) == 0
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.finish() == 0
    assert upstream.seen[0].headers["authorization"] == [f"Bearer {FAKE_KEY}"]
    assert FAKE_KEY not in relay.output
    finished = [json.loads(x) for x in relay.output.splitlines() if "request_finished" in x]
    assert finished[0]["outcome"] == "completed"
    assert relay.start["speedups"] is speedups.COMPILED  # which per-chunk code ran


async def test_sigterm_lets_open_streams_finish(upstream: FakeUpstream) -> None:
    """After SIGTERM: /readyz is 503, new requests are refused, the open stream completes."""
    feed = upstream.stream()
    async with relay_process(upstream.url) as relay, aiohttp.ClientSession() as session:
        response = await step(session.post(relay.url + STREAM, data=b"{}"))
        feed.send(b"data: 1\n\n")
        assert await step(response.content.readexactly(9)) == b"data: 1\n\n"
        relay.proc.send_signal(signal.SIGTERM)
        while (await relay.record()).get("event") != "draining":
            pass
        async with session.get(relay.admin_url + "/readyz") as ready:
            assert ready.status == 503
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await step(fresh.post(relay.url + STREAM, data=b"{}"))
        feed.send(b"data: 2\n\n")
        feed.end()
        assert await read_all(response) == b"data: 2\n\n"
        assert await relay.finish() == 0
    assert '"outcome":"completed"' in relay.output


async def test_sigterm_cuts_streams_left_after_the_grace(upstream: FakeUpstream) -> None:
    """A stream still open when RELAY_SHUTDOWN_GRACE ends is cut, and recorded as such."""
    feed = upstream.stream()
    async with relay_process(upstream.url, RELAY_SHUTDOWN_GRACE="0.3") as relay:
        async with aiohttp.ClientSession() as session:
            response = await step(session.post(relay.url + STREAM, data=b"{}"))
            feed.send(b"data: 1\n\n")
            await step(response.content.readexactly(9))
            relay.proc.send_signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(response.content.read(), STEP)
            response.close()
        assert await relay.finish() == 0
    assert '"outcome":"shutdown"' in relay.output
    await step(upstream.disconnected.wait())


async def test_upstream_failure_logs_never_show_the_key() -> None:
    """A refused upstream yields a 502 whose log and body carry no trace of the key."""
    async with relay_process("http://127.0.0.1:9") as relay, aiohttp.ClientSession() as s:
        async with s.post(relay.url + STREAM, data=b"{}") as response:
            assert response.status == 502
            assert FAKE_KEY not in await response.text()
        relay.proc.send_signal(signal.SIGTERM)
        await relay.finish()
    assert FAKE_KEY not in relay.output
    assert "upstream_unavailable" in relay.output


def test_check_config_lists_problems_and_never_the_key(capsys) -> None:
    """check-config prints the redacted configuration, or every problem with exit 2."""
    from relay.cli import main

    assert main(["check-config"], {"WAVESPEED_API_KEY": FAKE_KEY}) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["api_key"] == "<redacted>"
    assert FAKE_KEY not in out

    assert main(["check-config"], {"RELAY_PORT": "x", "RELAY_LOG_LEVEL": "loud"}) == 2
    err = capsys.readouterr().err
    for name in ("RELAY_PORT", "RELAY_LOG_LEVEL", "WAVESPEED_API_KEY"):
        assert name in err


@pytest.mark.parametrize(
    ("argv", "taken", "setting"),
    [
        (["serve"], "RELAY_PORT", "RELAY_PORT"),
        (["serve"], "RELAY_ADMIN_PORT", "RELAY_ADMIN_PORT"),
        (["serve", "--workers", "2"], "RELAY_PORT", "RELAY_PORT"),
        (["serve", "--workers", "2"], "RELAY_ADMIN_PORT", "RELAY_ADMIN_PORT"),
        (["demo"], "RELAY_PORT", "RELAY_PORT"),
        (["mock-upstream", "--port"], "argument", "--port"),
    ],
    ids=["serve", "serve-admin", "workers", "workers-admin", "demo", "mock-upstream"],
)
async def test_a_port_in_use_is_one_line_naming_the_setting(
    argv: list[str], taken: str, setting: str
) -> None:
    """A listener whose port is taken ends the command with exit 1 and one line naming the
    address, the reason and the setting to change: no traceback."""
    with contextlib.closing(socket.create_server(("127.0.0.1", 0))) as holder:
        port = str(holder.getsockname()[1])
        environ = {
            "PATH": os.environ["PATH"],
            "WAVESPEED_API_KEY": FAKE_KEY,
            "RELAY_PORT": "0",
            "RELAY_ADMIN_PORT": "0",
        }
        if taken == "argument":
            argv = [*argv, port]
        else:
            environ[taken] = port
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", *argv,
            env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await step(proc.communicate())
    assert proc.returncode == 1, out.decode() + err.decode()
    message = err.decode()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (set {setting})" in message
    assert "Traceback" not in message
    assert message.count("\n") == 1
    assert "relay_stopped" not in out.decode()  # it never started


async def test_mock_upstream_says_where_it_listens_and_stops_on_sigterm() -> None:
    """``relay mock-upstream --port 0`` logs the address it took, answers a stream there, and
    exits 0 on SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "mock-upstream", "--port", "0",
        env={"PATH": os.environ["PATH"]}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        record = json.loads(await step(proc.stdout.readline()))
        assert record["event"] == "mock_upstream_started"
        url = record["url"] + STREAM + "?delay=0"
        headers = {"Authorization": "Bearer any"}
        async with aiohttp.ClientSession() as s, s.post(url, json={}, headers=headers) as r:
            assert r.status == 200
            assert b"data: [DONE]" in await read_all(r)
        proc.send_signal(signal.SIGTERM)
        assert await step(proc.wait()) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
