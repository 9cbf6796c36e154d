"""`relay serve --workers N`: one port, one /metrics summed over workers, crash restarts."""

from __future__ import annotations

import os
import signal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FakeUpstream, Feed, read_all, step
from tests.test_cli import STREAM, RelayProcess, relay_process


async def _samples(session: aiohttp.ClientSession, relay: RelayProcess, name: str) -> float:
    async with session.get(relay.admin_url + "/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def _worker_pids(relay: RelayProcess, count: int) -> list[int]:
    pids = [int(r["pid"]) for r in map(_json, relay.lines) if r.get("event") == "worker_started"]
    while len(pids) < count:
        record = await relay.record()
        if record.get("event") == "worker_started":
            pids.append(int(record["pid"]))
    return pids


async def _first_event(
    session: aiohttp.ClientSession, relay: RelayProcess, feed: Feed
) -> aiohttp.ClientResponse:
    """Open a stream through the workers and read its first event."""
    response = await step(session.post(relay.url + STREAM, data=b"{}"))
    feed.send(b"data: 1\n\n")
    assert await step(response.content.readexactly(9)) == b"data: 1\n\n"
    return response


def _json(line: str) -> dict:
    import json

    try:
        return json.loads(line)
    except ValueError:
        return {}


async def test_two_workers_report_one_sum(upstream: FakeUpstream) -> None:
    """Requests on fresh connections are counted once each in the supervisor's /metrics."""
    upstream.respond(200, b'{"code":200}', {"Content-Type": "application/json"})
    async with relay_process(upstream.url, "--workers", "2") as relay:
        await _worker_pids(relay, 2)
        for _ in range(12):
            async with (
                aiohttp.ClientSession() as fresh,  # a new connection each time
                fresh.post(relay.url + STREAM, data=b"{}") as response,
            ):
                assert response.status == 200
                await response.read()
        async with aiohttp.ClientSession() as session:
            assert await _samples(session, relay, "relay_requests_total") == 12
            async with session.get(relay.admin_url + "/readyz") as ready:
                assert ready.status == 200
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.finish() == 0


async def test_active_streams_are_summed_live(upstream: FakeUpstream) -> None:
    """An open stream shows in relay_active_streams across workers, and leaves it when done."""
    feed = upstream.stream()
    async with relay_process(upstream.url, "--workers", "2") as relay:
        await _worker_pids(relay, 2)
        async with aiohttp.ClientSession() as session:
            response = await _first_event(session, relay, feed)
            assert await _samples(session, relay, "relay_active_streams") == 1
            feed.end()
            await read_all(response)
            response.release()
            finished = await relay.record()
            while finished.get("event") != "request_finished":
                finished = await relay.record()
            assert await _samples(session, relay, "relay_active_streams") == 0
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.finish() == 0


async def test_a_crashed_worker_is_restarted(upstream: FakeUpstream) -> None:
    """A worker killed with SIGKILL is replaced, and the port keeps serving."""
    upstream.respond(200, b"{}")
    async with relay_process(upstream.url, "--workers", "2") as relay:
        first, second = await _worker_pids(relay, 2)
        os.kill(first, signal.SIGKILL)
        while (record := await relay.record()).get("event") != "worker_started":
            pass
        assert int(record["pid"]) not in (first, second)
        for _ in range(4):
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.post(relay.url + STREAM, data=b"{}") as response,
            ):
                assert response.status == 200
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.finish() == 0
    assert '"worker_died"' in relay.output


async def test_sigterm_lets_a_workers_stream_finish(upstream: FakeUpstream) -> None:
    """SIGTERM to the supervisor: /readyz 503, the open stream completes, exit 0."""
    feed = upstream.stream()
    async with relay_process(upstream.url, "--workers", "2") as relay:
        await _worker_pids(relay, 2)
        async with aiohttp.ClientSession() as session:
            response = await _first_event(session, relay, feed)
            relay.proc.send_signal(signal.SIGTERM)
            record = await relay.record()
            while (record.get("event"), record.get("logger")) != ("draining", "relay.workers"):
                record = await relay.record()
            async with session.get(relay.admin_url + "/readyz") as ready:
                assert ready.status == 503
            feed.send(b"data: 2\n\n")
            feed.end()
            assert await read_all(response) == b"data: 2\n\n"
        assert await relay.finish() == 0
    assert '"outcome":"completed"' in relay.output


async def test_a_metrics_folder_of_its_own_is_removed_on_exit(
    upstream: FakeUpstream, tmp_path
) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR the supervisor keeps the workers' metrics in a
    temporary folder, and removes it when it exits; every run would leave one otherwise."""
    feed = upstream.stream()
    async with relay_process(upstream.url, "--workers", "2", TMPDIR=str(tmp_path)) as relay:
        await _worker_pids(relay, 2)
        async with aiohttp.ClientSession() as session:
            response = await _first_event(session, relay, feed)
            feed.end()
            assert await read_all(response) == b""
        (folder,) = tmp_path.glob("relay-metrics-*")
        assert list(folder.glob("*.db")), "the workers' metrics are not in the folder"
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.finish() == 0
    assert not list(tmp_path.glob("relay-metrics-*"))
