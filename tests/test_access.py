"""Access control: credentials, origins and CORS, per-client limits, prediction ownership."""

from __future__ import annotations

import hashlib
import time

import aiohttp
import jwt
import pytest

from relay import access
from relay.access import Authenticator, client_address, mint_token
from relay.config import ConfigError, load_config
from relay.limits import MemoryStore, gcra
from relay.state import STATE
from tests.conftest import (
    FAKE_KEY,
    STEP,
    FakeUpstream,
    Relay,
    RelayFactory,
    give_up_before_headers,
    make_config,
    read_all,
    step,
)

SECRET = "s3cret-for-tests-only-" + "0123456789abcdef" * 3  # long enough for HS512 too
STREAM = "/api/v3/wavespeed-ai/any-llm/stream"
APP = "https://app.example"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token(**claims) -> str:
    claims = {"sub": "alice", "exp": int(time.time()) + 60, **claims}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, algorithm="HS256")


@pytest.fixture
async def guarded(make_relay: RelayFactory, tmp_path) -> Relay:
    keys = tmp_path / "keys"
    keys.write_text(f"# name per key\n{hashlib.sha256(b'ck-good').hexdigest()} mobile-app\n")
    return await make_relay(
        client_auth=frozenset({"token", "key"}),
        token_secret=SECRET,
        client_keys=load_config(
            None, {"WAVESPEED_API_KEY": "k", "RELAY_CLIENT_KEYS_FILE": str(keys)}
        ).client_keys,
        allowed_origins=(APP,),
    )


def _header(alg: str) -> str:
    import base64
    import json

    raw = json.dumps({"alg": alg, "typ": "JWT"}).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _alg_none() -> str:
    good = token()
    _, payload, _ = good.split(".")
    return f"{_header('none')}.{payload}."


CREDENTIALS = [
    ("none", {}, 401),
    ("not bearer", {"Authorization": "Basic YWxpY2U6eA=="}, 401),
    ("expired", bearer(token(exp=int(time.time()) - 120)), 401),
    (
        "wrong secret",
        bearer(jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256")),
        401,
    ),
    ("alg none", bearer(_alg_none()), 401),
    (
        "another algorithm",
        bearer(jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512")),
        401,
    ),
    ("missing exp", bearer(jwt.encode({"sub": "a"}, SECRET, algorithm="HS256")), 401),
    (
        "missing sub",
        bearer(jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")),
        401,
    ),
    ("garbage", bearer("a.b.c"), 401),
    ("wrong client key", bearer("ck-bad"), 401),
    ("scoped to other models", bearer(token(models=["minimax/*"])), 403),
    (
        "scoped to other origins",
        {**bearer(token(origins=["https://other.example"])), "Origin": APP},
        403,
    ),
    ("foreign origin", {**bearer(token()), "Origin": "https://evil.example"}, 403),
]


@pytest.mark.parametrize(
    ("case", "headers", "status"), CREDENTIALS, ids=[c[0] for c in CREDENTIALS]
)
async def test_bad_credentials_never_reach_the_upstream(
    upstream: FakeUpstream, guarded: Relay, case: str, headers: dict, status: int
) -> None:
    """Every refused credential gets its 401/403 envelope and no upstream contact."""
    upstream.respond(200, b"{}")
    response = await step(guarded.client.post(STREAM, data=b"{}", headers=headers))
    assert response.status == status, case
    body = await response.json()
    assert body["data"]["error"] in ("unauthorized", "model_not_allowed", "origin_not_allowed")
    assert not upstream.seen


@pytest.mark.parametrize(
    "headers",
    [bearer(token()), bearer(token(models=["wavespeed-ai/*"], origins=[APP])), bearer("ck-good")],
    ids=["token", "narrowed token", "client key"],
)
async def test_good_credentials_stream_and_are_not_forwarded(
    upstream: FakeUpstream, guarded: Relay, headers: dict
) -> None:
    """A valid token or client key streams; the upstream sees only the provider key."""
    upstream.respond(200, b"data: [DONE]\n\n", {"Content-Type": "text/event-stream"})
    response = await step(
        guarded.client.post(STREAM, data=b"{}", headers={**headers, "Origin": APP})
    )
    assert response.status == 200
    assert await read_all(response) == b"data: [DONE]\n\n"
    assert upstream.seen[0].headers["authorization"] == [f"Bearer {FAKE_KEY}"]


async def test_preflight_for_allowed_and_foreign_origins(
    upstream: FakeUpstream, guarded: Relay
) -> None:
    """An allowed origin gets a cacheable preflight answer; a foreign one the 403 envelope."""
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    ok = await guarded.client.options(STREAM, headers={"Origin": APP, **ask})
    assert ok.status == 204
    assert ok.headers["Access-Control-Allow-Origin"] == APP
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in ok.headers["Access-Control-Allow-Headers"]
    assert "X-Request-ID" in ok.headers["Access-Control-Allow-Headers"]
    assert int(ok.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in ok.headers.getall("Vary")
    foreign = await guarded.client.options(
        STREAM, headers={"Origin": "https://evil.example", **ask}
    )
    assert foreign.status == 403
    assert "Access-Control-Allow-Origin" not in foreign.headers
    assert (await foreign.json())["data"]["error"] == "origin_not_allowed"
    assert not upstream.seen


async def test_cors_headers_on_streamed_and_error_responses(
    upstream: FakeUpstream, guarded: Relay
) -> None:
    """Streams and error envelopes to an allowed origin carry CORS headers, X-Request-ID exposed."""
    feed = upstream.stream(headers={"Access-Control-Allow-Origin": "*"})
    response = await step(
        guarded.client.post(STREAM, data=b"{}", headers={**bearer(token()), "Origin": APP})
    )
    assert response.headers.getall("Access-Control-Allow-Origin") == [APP]
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]
    feed.end()
    await read_all(response)
    refused = await guarded.client.post(STREAM, data=b"{}", headers={"Origin": APP})
    assert refused.status == 401
    assert refused.headers["Access-Control-Allow-Origin"] == APP


async def test_same_origin_pages_are_allowed(upstream: FakeUpstream, relay: Relay) -> None:
    """A page the relay serves itself may call it: its own origin is always allowed."""
    upstream.respond(200, b"{}")
    response = await relay.client.post(STREAM, data=b"{}", headers={"Origin": relay.url})
    assert response.status == 200
    other = await relay.client.post(STREAM, data=b"{}", headers={"Origin": "http://127.0.0.1:1"})
    assert other.status == 403


def test_gcra_allows_exactly_the_burst_then_refills() -> None:
    """N requests pass at once, the next waits one interval, and one more passes after it."""
    tat, now = None, 100.0
    for _ in range(3):
        tat, retry = gcra(tat, now, 20.0, 3)
        assert retry == 0
    assert gcra(tat, now, 20.0, 3) == (None, pytest.approx(20.0))
    assert gcra(tat, now + 19.999, 20.0, 3)[0] is None
    assert gcra(tat, now + 20.0, 20.0, 3)[1] == 0


async def test_rate_limit_boundary_with_an_injected_clock(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """RELAY_RATE_LIMIT=2/minute: two requests pass, the third is 429 until time moves on."""
    now = [1000.0]
    relay = await make_relay(rate_limit=(2, 60.0), store=MemoryStore(clock=lambda: now[0]))
    upstream.respond(200, b"{}")
    for _ in range(2):
        assert (await relay.client.post(STREAM, data=b"{}")).status == 200
    limited = await relay.client.post(STREAM, data=b"{}")
    assert limited.status == 429
    assert limited.headers["Retry-After"] == "30"
    assert (await limited.json())["data"]["error"] == "rate_limited"
    now[0] += 30
    assert (await relay.client.post(STREAM, data=b"{}")).status == 200
    assert len(upstream.seen) == 3


async def test_token_rpm_claim_only_narrows(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A token's rpm lowers the limit; a larger rpm than configured does not raise it."""
    now = [0.0]
    relay = await make_relay(
        client_auth=frozenset({"token"}), token_secret=SECRET, rate_limit=(3, 60.0),
        store=MemoryStore(clock=lambda: now[0]),
    )  # fmt: skip
    upstream.respond(200, b"{}")
    strict, generous = bearer(token(sub="s", rpm=1)), bearer(token(sub="g", rpm=1000))
    assert [(await relay.client.post(STREAM, headers=strict)).status for _ in range(2)] == [
        200,
        429,
    ]
    statuses = [(await relay.client.post(STREAM, headers=generous)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def _open_stream(relay: Relay, headers: dict | None = None) -> aiohttp.ClientResponse:
    response = await step(relay.client.post(STREAM, data=b"{}", headers=headers or {}))
    assert response.status == 200
    return response


async def test_stream_slots_are_released_on_completion_disconnect_and_upstream_error(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """With one slot per client, each way a stream ends frees the slot for the next."""
    relay = await make_relay(max_streams_per_client=1)
    state = relay.app[STATE]

    feed = upstream.stream()
    first = await _open_stream(relay)
    busy = await relay.client.post(STREAM, data=b"{}")
    assert busy.status == 429
    assert (await busy.json())["message"].startswith("at most 1 concurrent")
    feed.end()  # 1: completion
    await read_all(first)
    assert await state.wait_streams_closed(STEP)

    feed = upstream.stream()
    second = await _open_stream(relay)
    second.close()  # 2: the client leaves
    await step(upstream.disconnected.wait())
    assert await state.wait_streams_closed(STEP)

    feed = upstream.stream()
    third = await _open_stream(relay)
    feed.abort()  # 3: the upstream fails
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all(third)
    assert await state.wait_streams_closed(STEP)

    upstream.respond(200, b"{}")
    assert (await relay.client.post(STREAM, data=b"{}")).status == 200


async def test_process_wide_stream_cap_answers_503(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """Past RELAY_MAX_STREAMS the relay answers 503 with Retry-After before the upstream."""
    relay = await make_relay(max_streams=1)
    feed = upstream.stream()
    first = await _open_stream(relay)
    full = await relay.client.post(STREAM, data=b"{}", headers={"X-Forwarded-For": "10.9.9.9"})
    assert full.status == 503
    assert full.headers["Retry-After"] == "1"
    assert len(upstream.seen) == 1
    feed.end()
    await read_all(first)


async def test_predictions_are_visible_only_to_their_submitter(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """The client that submitted a task may poll it; any other client gets 404."""
    relay = await make_relay(client_auth=frozenset({"token"}), token_secret=SECRET)
    envelope = b'{"code":200,"message":"success","data":{"id":"task-9f","status":"created"}}'

    async def handler(request):
        from aiohttp import web

        if request.method == "POST":
            return web.Response(body=envelope, content_type="application/json")
        return web.json_response({"code": 200, "data": {"id": "task-9f", "status": "completed"}})

    upstream.handler = handler
    alice, bob = bearer(token(sub="alice")), bearer(token(sub="bob"))
    submitted = await relay.client.post("/api/v3/acme/model", data=b"{}", headers=alice)
    assert await read_all(submitted) == envelope  # bytes untouched by the ownership tap
    assert (
        await relay.client.get("/api/v3/predictions/task-9f/result", headers=alice)
    ).status == 200
    for path in ("/api/v3/predictions/task-9f", "/api/v3/predictions/task-9f/result"):
        other = await relay.client.get(path, headers=bob)
        assert other.status == 404
        assert (await other.json())["data"]["error"] == "not_found"
    unknown = await relay.client.get("/api/v3/predictions/never-submitted", headers=alice)
    assert unknown.status == 404
    assert [s.method for s in upstream.seen] == ["POST", "GET"]


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        ("203.0.113.5", ["1.2.3.4"], (), "203.0.113.5"),  # no trusted proxies: XFF ignored
        ("10.0.0.2", ["1.2.3.4"], ("10.0.0.0/8",), "1.2.3.4"),
        (
            "10.0.0.2",
            ["6.6.6.6, 1.2.3.4, 10.0.0.7"],
            ("10.0.0.0/8",),
            "1.2.3.4",
        ),  # spoofed left part
        ("198.51.100.1", ["1.2.3.4"], ("10.0.0.0/8",), "198.51.100.1"),  # untrusted peer
        ("10.0.0.2", [], ("10.0.0.0/8",), "10.0.0.2"),
    ],
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(peer, xff, trusted, expected) -> None:
    """X-Forwarded-For is walked from the right, through trusted proxies only."""
    import ipaddress

    networks = tuple(ipaddress.ip_network(t) for t in trusted)
    assert client_address(peer, xff, networks) == expected


@pytest.mark.parametrize(
    ("env", "ok"),
    [
        ({"RELAY_HOST": "0.0.0.0"}, False),
        ({"RELAY_HOST": "0.0.0.0", "RELAY_ALLOW_ANONYMOUS": "true"}, True),
        ({"RELAY_HOST": "127.0.0.1"}, True),
        (
            {"RELAY_HOST": "0.0.0.0", "RELAY_CLIENT_AUTH": "token", "RELAY_TOKEN_SECRET": SECRET},
            True,
        ),
        ({"RELAY_CLIENT_AUTH": "token", "RELAY_TOKEN_SECRET": "short"}, False),
        ({"RELAY_CLIENT_AUTH": "key"}, False),
    ],
)
def test_fail_closed_configuration(env: dict, ok: bool) -> None:
    """Anonymous serving off loopback, short secrets and missing key files stop start-up."""
    environ = {"WAVESPEED_API_KEY": FAKE_KEY, **env}
    if ok:
        load_config(None, environ)
    else:
        with pytest.raises(ConfigError) as error:
            load_config(None, environ)
        assert SECRET not in str(error.value)


def test_serve_refuses_anonymous_on_a_public_address(capsys) -> None:
    """`relay serve` with RELAY_CLIENT_AUTH=none on 0.0.0.0 exits 2 and says why."""
    from relay.cli import main

    assert main(["serve"], {"WAVESPEED_API_KEY": FAKE_KEY, "RELAY_HOST": "0.0.0.0"}) == 2
    err = capsys.readouterr().err
    assert "RELAY_ALLOW_ANONYMOUS" in err
    assert FAKE_KEY not in err


def test_relay_token_command_mints_a_verifiable_token(capsys) -> None:
    """`relay token` prints an HS256 token with sub, exp and the narrowing claims."""
    from relay.cli import main

    env = {"RELAY_TOKEN_SECRET": SECRET}
    assert (
        main(
            ["token", "--sub", "user-1", "--ttl", "120", "--models", "minimax/*", "--rpm", "5"], env
        )
        == 0
    )
    claims = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "user-1"
    assert claims["models"] == ["minimax/*"]
    assert claims["rpm"] == 5
    assert 110 <= claims["exp"] - time.time() <= 121
    assert main(["token", "--sub", "x", "--ttl", "1"], {}) == 2


def test_minted_tokens_round_trip() -> None:
    """mint_token output is accepted by PyJWT with the pinned algorithm."""
    raw = mint_token(SECRET, "svc", 60, origins=[APP], streams=2)
    claims = jwt.decode(raw, SECRET, algorithms=["HS256"])
    assert (claims["origins"], claims["streams"]) == ([APP], 2)


async def test_slot_is_released_when_the_client_leaves_before_headers(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """A client that gives up while the upstream is silent frees its slot."""
    relay = await make_relay(max_streams_per_client=1)
    await give_up_before_headers(relay, upstream, STREAM)
    assert await relay.app[STATE].wait_streams_closed(STEP)
    upstream.respond(200, b"{}")
    assert (await relay.client.post(STREAM, data=b"{}")).status == 200


async def test_preflights_are_recorded_with_their_status(
    upstream: FakeUpstream, guarded: Relay
) -> None:
    """An answered preflight counts as a 204 on route preflight, not as a client that left."""
    await guarded.client.options(
        STREAM, headers={"Origin": APP, "Access-Control-Request-Method": "POST"}
    )
    assert guarded.metric("relay_requests_total", route="preflight", model="-", code="204") == 1


class _FailingOwnership(MemoryStore):
    """Limits work; the ownership records fail as an unreachable Redis would."""

    async def remember(self, task_id: str, owner: str, ttl: float) -> None:
        from redis import ConnectionError as RedisConnectionError

        raise RedisConnectionError("down")

    async def owner(self, task_id: str) -> str | None:
        from redis import ConnectionError as RedisConnectionError

        raise RedisConnectionError("down")


async def test_ownership_state_failures_never_cut_a_submission(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """An answered submission stays intact when its owner cannot be recorded; polling is 503."""
    relay = await make_relay(store=_FailingOwnership())
    envelope = b'{"code":200,"message":"success","data":{"id":"task-x","status":"created"}}'
    upstream.respond(200, envelope, {"Content-Type": "application/json"})
    submitted = await step(relay.client.post("/api/v3/acme/model", data=b"{}"))
    assert submitted.status == 200
    assert await read_all(submitted) == envelope
    polled = await relay.client.get("/api/v3/predictions/task-x")
    assert polled.status == 503
    assert (await polled.json())["data"]["error"] == "overloaded"
    assert len(upstream.seen) == 1


def test_a_client_known_by_address_keeps_one_principal_and_the_kept_ones_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without client auth a principal is its address's: kept for the next request, up
    to a bound (an X-Forwarded-For from a trusted proxy can name any address)."""
    monkeypatch.setattr(access, "ADDRESSES_KEPT", 3)
    auth = Authenticator(make_config("http://127.0.0.1:1"))
    first = auth.authenticate(None, "203.0.113.5", ())
    assert first.id == "ip:203.0.113.5"
    assert auth.authenticate(None, "203.0.113.5", ()) is first
    assert auth.authenticate("Bearer ignored", "203.0.113.6", ()).id == "ip:203.0.113.6"
    for n in range(10):
        assert auth.authenticate(None, f"198.51.100.{n}", ()).id == f"ip:198.51.100.{n}"
    assert len(auth._by_address) <= 3
