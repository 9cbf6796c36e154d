"""Header filtering: what reaches the upstream, what reaches the client."""

from __future__ import annotations

import os

import pytest
from multidict import CIMultiDict

from relay.headers import client_response_headers, request_id_from, upstream_request_headers
from tests.conftest import FAKE_KEY, FakeUpstream, Relay, read_all, step

CLIENT_HEADERS = [
    ("Authorization", "Bearer client-secret", False),
    ("Cookie", "session=abc", False),
    ("Proxy-Authorization", "Basic eA==", False),
    ("Connection", "keep-alive, X-Hop", False),
    ("X-Hop", "named by Connection", False),
    ("Keep-Alive", "timeout=5", False),
    ("TE", "trailers", False),
    ("Upgrade", "websocket", False),
    ("Trailer", "X-Foo", False),
    ("Origin", "https://app.example", False),
    ("Referer", "https://app.example/page", False),
    ("X-Forwarded-For", "10.0.0.1", False),
    ("Forwarded", "for=10.0.0.1", False),
    ("Accept-Encoding", "gzip, br", False),
    ("Content-Type", "application/json", True),
    ("Accept", "text/event-stream", True),
    ("Accept-Language", "de", True),
    ("User-Agent", "my-app/1.0", True),
    ("X-Custom", "kept", True),
]


@pytest.mark.parametrize(("name", "value", "forwarded"), CLIENT_HEADERS)
def test_request_headers_table(name: str, value: str, forwarded: bool) -> None:
    """Each client header is forwarded or dropped as the table says."""
    client = [("Connection", "X-Hop"), (name, value)]
    out = CIMultiDict(
        upstream_request_headers(
            client, auth_header="Authorization", auth_value="Bearer KEY", request_id="r1"
        )
    )
    if forwarded:
        assert out.getall(name) == [value]
    else:
        assert value not in out.getall(name, [])


def test_key_and_identity_encoding_are_injected() -> None:
    """The provider key replaces any client credential; identity encoding is asked for."""
    out = CIMultiDict(
        upstream_request_headers(
            [("Authorization", "Bearer client")],
            auth_header="Authorization",
            auth_value="Bearer KEY",
            request_id="r1",
        )
    )
    assert out.getall("Authorization") == ["Bearer KEY"]
    assert out["Accept-Encoding"] == "identity"
    assert out["X-Request-ID"] == "r1"


RESPONSE_HEADERS = [
    ("Set-Cookie", "tracking=1", False),
    ("Connection", "close", False),
    ("Keep-Alive", "timeout=5", False),
    ("Transfer-Encoding", "chunked", False),
    ("Content-Type", "text/event-stream", True),
    ("Content-Encoding", "gzip", True),
    ("Cache-Control", "no-cache", True),
    ("X-Ratelimit-Remaining", "10", True),
    ("X-Accel-Buffering", "yes", False),  # the relay's own "no" replaces it
]


@pytest.mark.parametrize(("name", "value", "forwarded"), RESPONSE_HEADERS)
def test_response_headers_table(name: str, value: str, forwarded: bool) -> None:
    """Upstream headers pass except hop-by-hop and Set-Cookie; X-Accel-Buffering is added."""
    out = CIMultiDict(client_response_headers([(name, value)], request_id="r1"))
    assert (out.get(name) == value) is forwarded
    assert out.getall("X-Accel-Buffering") == ["no"]


@pytest.mark.parametrize(
    ("given", "kept"),
    [(["abc-123"], True), (["a" * 129], False), (["bad id"], False), (["x\u00e9"], False)],
)
def test_request_id_is_kept_only_when_well_formed(given: list[str], kept: bool) -> None:
    """A well-formed client X-Request-ID is kept; anything else is replaced."""
    assert (request_id_from(given) == given[0]) is kept


async def test_upstream_sees_the_key_and_never_the_client_credential(
    upstream: FakeUpstream, relay: Relay
) -> None:
    """End to end: the upstream gets the relay's key, not the client's token or cookie."""
    upstream.respond(200, b"{}", {"Content-Type": "application/json", "Set-Cookie": "a=b"})
    response = await step(
        relay.client.post(
            "/api/v3/wavespeed-ai/any-llm",
            data=b'{"prompt":"hi"}',
            headers={
                "Authorization": "Bearer client-token",
                "Cookie": "sid=1",
                "Content-Type": "application/json",
                "X-Request-ID": "req-42",
            },
        )
    )
    await read_all(response)
    (seen,) = upstream.seen
    assert seen.headers["authorization"] == [f"Bearer {FAKE_KEY}"]
    assert "cookie" not in seen.headers
    assert seen.headers["x-request-id"] == ["req-42"]
    assert seen.headers["accept-encoding"] == ["identity"]
    assert seen.body == b'{"prompt":"hi"}'
    assert "Set-Cookie" not in response.headers
    assert response.headers["X-Request-ID"] == "req-42"
    assert FAKE_KEY not in str(response.headers)


def test_fresh_request_ids_are_distinct_across_batches() -> None:
    """Fresh ids are drawn 256 at a time: 600 of them, across three draws, never repeat."""
    ids = [request_id_from([]) for _ in range(600)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_process_draws_request_ids_of_its_own() -> None:
    """A child forked mid-batch does not hand out its parent's remaining ids."""
    request_id_from([])  # the batch is drawn, and has ids left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id goes to the parent
        os.write(write, request_id_from([]).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32
    assert child != request_id_from([])
