"""Which paths are relayed: the raw-path grammar, the routes and the allowlist."""

from __future__ import annotations

import pytest

from relay.app import wavespeed_route
from relay.errors import BadRequest, MethodNotAllowed, ModelNotAllowed, NotFound, RelayError
from relay.policy import Allowlist, Target, resolve
from relay.routes import RESOLVED_KEPT_LENGTH, Router
from tests.conftest import FakeUpstream, Relay, make_config, raw_request

GOOD = [
    ("POST", "/api/v3/minimax/speech-02-hd/stream", Target("stream", "minimax/speech-02-hd", "/api/v3/minimax/speech-02-hd/stream", "")),
    ("POST", "/api/v3/wavespeed-ai/any-llm/vision/stream?x=1", Target("stream", "wavespeed-ai/any-llm/vision", "/api/v3/wavespeed-ai/any-llm/vision/stream", "x=1")),
    ("POST", "/api/v3/minimax/speech-2.5-hd-preview", Target("submit", "minimax/speech-2.5-hd-preview", "/api/v3/minimax/speech-2.5-hd-preview", "")),
    ("GET", "/api/v3/predictions/task-abc123", Target("prediction", "-", "/api/v3/predictions/task-abc123", "", "task-abc123", takes_slot=False)),
    ("GET", "/api/v3/predictions/ABC_123/result", Target("result", "-", "/api/v3/predictions/ABC_123/result", "", "ABC_123", takes_slot=False)),
]  # fmt: skip


@pytest.mark.parametrize(("method", "target", "expected"), GOOD)
def test_valid_paths_resolve_to_their_upstream_path(method, target, expected) -> None:
    """A well-formed path resolves to its route, model and rebuilt upstream path."""
    assert resolve(method, target) == expected


BAD = [
    ("/api/v3/minimax%2Fspeech-02-hd/stream", BadRequest),  # encoded slash
    ("/api/v3/minimax/%2e%2e/stream", BadRequest),  # encoded dots
    ("/api/v3/minimax/../secret/stream", BadRequest),
    ("/api/v3/minimax/./speech-02-hd/stream", BadRequest),
    ("/api/v3/minimax//speech-02-hd/stream", BadRequest),
    ("/api/v3//stream", BadRequest),
    ("/api/v3/", BadRequest),
    ("/api/v3/Minimax/Speech-02-HD/stream", BadRequest),  # upper case
    ("/api/v3/minimax/speech-02-hd;x=1/stream", BadRequest),
    ("/api/v3/minimax/speech-02-hd/stream/", BadRequest),  # trailing slash
    ("/api/v3/minimax/speech-02-hd\x00/stream", BadRequest),
    ("/api/v3/minimax/speech 02/stream", BadRequest),
    ("/api/v3/-leading-dash/stream", BadRequest),
    ("/api/v3/" + "a" * 201, BadRequest),
    ("/api/v3/predictions/../../admin", BadRequest),
    ("/api/v3/predictions/a/b/c", NotFound),
    ("/api/v2/minimax/speech-02-hd/stream", NotFound),
    ("/metrics/../api/v3/x", NotFound),
    ("http://evil.example/api/v3/x/stream", BadRequest),  # absolute-form target
]


@pytest.mark.parametrize(("target", "error"), BAD)
def test_crafted_paths_are_refused(target: str, error: type[RelayError]) -> None:
    """Paths outside the grammar are refused before any allowlist or upstream step."""
    with pytest.raises(error):
        resolve("POST", target)


def test_the_router_remembers_resolutions_but_never_refusals() -> None:
    """Resolving through the router's memo gives what resolving afresh gives, every time; a
    refusal is raised every time, and neither it nor a long target is kept."""
    router = Router(wavespeed_route(make_config("http://127.0.0.1:9")), ())
    long = "/api/v3/acme/x/stream?" + "q" * RESOLVED_KEPT_LENGTH
    for _ in range(2):
        for method, target, expected in GOOD:
            assert router.resolve(method, target) == (router.wavespeed, expected)
        for target, error in BAD:
            with pytest.raises(error):
                router.resolve("POST", target)
        assert router.resolve("POST", long)[1].query == "q" * RESOLVED_KEPT_LENGTH
    assert router._remembered.cache_info().currsize == len(GOOD)


def test_wrong_methods_get_405_with_allow() -> None:
    """GET on a submission path and POST on a polling path name the right method."""
    with pytest.raises(MethodNotAllowed) as get:
        resolve("GET", "/api/v3/minimax/speech-02-hd/stream")
    assert get.value.allow == ("POST",)
    with pytest.raises(MethodNotAllowed) as post:
        resolve("POST", "/api/v3/predictions/abc")
    assert post.value.allow == ("GET",)


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        ("minimax/speech-02-hd", True),
        ("minimax/speech-02-hd-x", False),
        ("acme/anything", True),
        ("acme/deep/model", True),
        ("acme", False),
        ("acmecorp/model", False),
        ("wavespeed-ai/any-llm/vision", False),
    ],
)
def test_allowlist_takes_exact_ids_and_family_patterns(model: str, allowed: bool) -> None:
    """Exact ids match exactly; ``family/*`` matches ids under that family only."""
    allowlist = Allowlist(("minimax/speech-02-hd", "acme/*", "wavespeed-ai/any-llm"))
    assert allowlist.allows(model) is allowed


RAW = [
    (b"POST /api/v3/minimax%2Fspeech-02-hd/stream HTTP/1.1", b"400"),
    (b"POST /api/v3/minimax/%2E%2E/x/stream HTTP/1.1", b"400"),
    (b"POST /api/v3/minimax/../acme/x/stream HTTP/1.1", b"400"),
    (b"POST /api/v3/acme/./x/stream HTTP/1.1", b"400"),
    (b"POST /api/v3/acme//x/stream HTTP/1.1", b"400"),
    (b"POST /api/v3/ACME/x/stream HTTP/1.1", b"400"),
    (b"POST /api/v3/acme/x;jsessionid=1/stream HTTP/1.1", b"400"),
    (b"POST /api/v3/acme/x\x00/stream HTTP/1.1", b"400"),
    (b"POST /api/v3/acme/x/stream/junk/ HTTP/1.1", b"400"),
    (b"POST /api/v3/other/model/stream HTTP/1.1", b"403"),
    (b"POST /api/v3/minimax/speech-02-turbo/stream HTTP/1.1", b"403"),
]


@pytest.mark.parametrize(("request_line", "status"), RAW)
async def test_crafted_raw_paths_never_reach_the_upstream(
    upstream: FakeUpstream, relay: Relay, request_line: bytes, status: bytes
) -> None:
    """Sent byte for byte on a socket, crafted paths get 400 or 403 and no upstream contact."""
    upstream.respond(200, b"should not be seen")
    head = await raw_request(
        relay.url, request_line + b"\r\nHost: relay\r\nContent-Length: 0\r\n\r\n"
    )
    assert head.split(b" ")[1] == status
    assert not upstream.seen


async def test_model_not_allowed_envelope(upstream: FakeUpstream, relay: Relay) -> None:
    """A model off the list gets the 403 envelope naming it, and no upstream contact."""
    response = await relay.client.post("/api/v3/other/model/stream", data=b"{}")
    assert response.status == 403
    assert await response.json() == {
        "code": 403,
        "message": "model 'other/model' is not allowed by this relay",
        "data": {"error": ModelNotAllowed.code},
    }
    assert not upstream.seen
