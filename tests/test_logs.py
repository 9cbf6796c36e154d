"""Logs: one request_finished per request, the request id everywhere, no key anywhere."""

from __future__ import annotations

import datetime
import io
import json
import logging
from collections.abc import Iterator

import aiohttp
import pytest
import structlog

from relay import log
from relay.state import STATE
from tests.conftest import FAKE_KEY, STEP, FakeUpstream, Relay, read_all, step

STREAM = "/api/v3/wavespeed-ai/any-llm/stream"
FIELDS = {
    "request_id",
    "route",
    "model",
    "status",
    "outcome",
    "bytes_in",
    "bytes_out",
    "chunks",
    "ttfb_ms",
    "duration_ms",
    "client",
}


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def finished(self) -> list[dict]:
        return [r for r in self.records if r["event"] == "request_finished"]


@pytest.fixture
def logs() -> Iterator[Captured]:
    captured = Captured()
    log.configure("debug", "json", secrets=[FAKE_KEY], stream=captured.stream)
    yield captured
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


async def test_one_record_per_request_with_the_spec_fields(
    upstream: FakeUpstream, relay: Relay, logs: Captured
) -> None:
    """Each request, streamed or refused, yields exactly one request_finished record."""
    feed = upstream.stream()
    response = await step(
        relay.client.post(STREAM, data=b"{}", headers={"X-Request-ID": "trace-1"})
    )
    feed.send(b"data: [DONE]\n\n")
    feed.end()
    await read_all(response)
    await read_all(await relay.client.post("/api/v3/other/model", data=b"{}"))
    assert await relay.app[STATE].wait_streams_closed(STEP)

    streamed, refused = logs.finished()
    assert set(streamed) >= FIELDS
    assert streamed["request_id"] == "trace-1"
    assert upstream.seen[0].headers["x-request-id"] == ["trace-1"]
    assert (streamed["status"], streamed["outcome"], streamed["bytes_out"]) == (
        200,
        "completed",
        14,
    )
    assert (streamed["events"], streamed["terminal"]) == (1, "done")
    assert streamed["ttfb_ms"] >= 0
    assert (refused["status"], refused["outcome"], refused["error"]) == (
        403,
        "rejected",
        "model_not_allowed",
    )
    assert refused["request_id"] != "trace-1"


async def test_records_inside_a_request_carry_its_id(
    upstream: FakeUpstream, relay: Relay, logs: Captured
) -> None:
    """A record logged while a request is handled carries that request's id."""

    async def handler(request):
        from aiohttp import web

        return web.Response(text="ok")

    upstream.handler = handler
    inner = structlog.get_logger("relay.test")
    original = relay.app[STATE].metrics.finish

    def finish(exchange, duration):
        inner.info("inside")
        original(exchange, duration)

    relay.app[STATE].metrics.finish = finish  # type: ignore[method-assign]
    await read_all(await relay.client.post(STREAM, data=b"{}", headers={"X-Request-ID": "rid-7"}))
    (inside,) = [r for r in logs.records if r["event"] == "inside"]
    assert inside["request_id"] == "rid-7"


async def test_upstream_errors_never_leak_the_key(
    upstream: FakeUpstream, relay: Relay, logs: Captured
) -> None:
    """Cut streams and refused upstreams log their failure without the key."""
    feed = upstream.stream()
    response = await step(relay.client.post(STREAM, data=b"{}"))
    feed.send(b"data: 1\n\n")
    feed.abort()
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all(response)
    assert await relay.app[STATE].wait_streams_closed(STEP)
    (record,) = logs.finished()
    assert record["outcome"] == "upstream_error"
    assert FAKE_KEY not in logs.stream.getvalue()


def test_foreign_records_are_json_and_redacted(logs: Captured) -> None:
    """aiohttp's and asyncio's records are JSON too, with keys and bearer tokens removed."""
    headers = {"Authorization": f"Bearer {FAKE_KEY}", "X-Other": "Bearer abc.def-ghi"}
    try:
        raise aiohttp.ClientResponseError(None, (), message=f"failed with {headers!r}")  # type: ignore[arg-type]
    except aiohttp.ClientResponseError:
        logging.getLogger("aiohttp.client").exception("request failed: %r", headers)
    logging.getLogger("asyncio").error("Task exception: key=%s", FAKE_KEY)
    text = logs.stream.getvalue()
    assert FAKE_KEY not in text
    assert "abc.def-ghi" not in text
    aio, loop = logs.records
    assert aio["logger"] == "aiohttp.client"
    assert aio["level"] == "error"
    assert "[REDACTED]" in aio["event"]
    assert loop["logger"] == "asyncio"


def test_a_record_json_cannot_carry_as_it_is_is_still_one_ascii_json_line(
    logs: Captured,
) -> None:
    """A lone surrogate (a token's sub may hold one, a foreign record too) and an integer
    past 64 bits are refused by the fast renderer, and other characters than ASCII would
    be written raw; each record is still written, escaped, so that a stdout in any
    encoding takes it."""
    logger = structlog.get_logger("relay")
    logger.info("odd", client="token:\udc80", n=2**70, key=FAKE_KEY)
    logger.info("wide", client="token:\u7528\u6237")
    logger.info("plain", size=1)
    assert logs.stream.getvalue().isascii()
    odd, wide, plain = logs.records
    assert (odd["client"], odd["n"], odd["key"]) == ("token:\udc80", 2**70, "[REDACTED]")
    assert wide["client"] == "token:\u7528\u6237"
    assert plain["size"] == 1


def test_console_format_is_human_readable() -> None:
    """RELAY_LOG_FORMAT=console renders key=value lines, still redacted."""
    stream = io.StringIO()
    log.configure("info", "console", secrets=[FAKE_KEY], stream=stream)
    try:
        structlog.get_logger("relay").info("hello", key=FAKE_KEY, n=1)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    line = stream.getvalue()
    assert "hello" in line
    assert "n=1" in line
    assert FAKE_KEY not in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("Bearer abc.def", "Bearer [REDACTED]"),
        ("x\tbasic\tQWxhZGRpbjo=", "x\tbasic [REDACTED]"),
        ("Bearer\u00a0abc", "Bearer [REDACTED]"),  # a no-break space is whitespace too
        ("bearer\nabc", "bearer [REDACTED]"),
        ("key sk-test-FAKE-0123456789abcdef here", "key [REDACTED] here"),
        ("ip:127.0.0.1", "ip:127.0.0.1"),
        ("wavespeed-ai/any-llm", "wavespeed-ai/any-llm"),
    ],
)
def test_redaction_table(text: str, scrubbed: str) -> None:
    """Secrets and bearer-shaped credentials go whatever whitespace separates them; other
    values pass unchanged. A record is scrubbed value by value to the same effect, nested
    values included, beside values that need nothing (the usual record takes one look at
    all its strings together)."""
    redactor = log.Redactor([FAKE_KEY])
    assert redactor.scrub(text) == scrubbed
    plain = {"event": "request_finished", "status": 200, "ttfb_ms": 1.5, "outcome": None}
    assert redactor(None, "info", {**plain, "value": text}) == {**plain, "value": scrubbed}
    nested = {**plain, "value": [text, {"deeper": (text,)}]}
    expected = {**plain, "value": [scrubbed, {"deeper": [scrubbed]}]}
    assert redactor(None, "info", nested) == expected


def test_a_record_is_not_redacted_for_a_secret_only_its_values_together_spell() -> None:
    record = {"model": "sk-one", "client": "two"}
    assert log.Redactor(["sk-one|two"])(None, "info", dict(record)) == record


@pytest.mark.parametrize(
    "nanos",
    [1_765_118_740_123_456_789, 1_765_118_740_000_000_000, 1_765_118_740_000_000_999, 999],
    ids=["fraction", "whole-second", "under-a-microsecond", "epoch"],
)
def test_the_timestamp_is_structlogs_iso_utc_to_the_character(
    monkeypatch: pytest.MonkeyPatch, nanos: int
) -> None:
    monkeypatch.setattr(log.time, "time_ns", lambda: nanos)
    at = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    at += datetime.timedelta(microseconds=nanos // 1000)
    stamped = log.UtcStamper()(None, "info", {})["timestamp"]
    assert stamped == at.isoformat().replace("+00:00", "Z")  # what TimeStamper writes
