"""Pure header filtering in both directions: what crosses the relay, what never does.

Towards the upstream the client's credentials, cookies, hop-by-hop headers (and any header
the ``Connection`` header names), forwarding headers and the framing headers are dropped;
the provider key is injected and ``Accept-Encoding: identity`` asked for, so the bytes are
never compressed on the way to us and never decompressed by us.

Towards the client the upstream's hop-by-hop headers, ``Set-Cookie``, its CORS headers
(the relay answers CORS for its own origins) and the two the relay sets itself
(``X-Request-ID``, ``X-Accel-Buffering: no``) are dropped;
everything else, ``Content-Type``, ``Content-Length`` and ``Content-Encoding`` included,
passes unchanged because the body passes unchanged.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Iterator, Sequence

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Never towards the upstream: credentials, browser identity, framing the relay redoes, and
# forwarding headers a client could forge.
_REQUEST_DROP = HOP_BY_HOP | {
    "authorization",
    "cookie",
    "host",
    "content-length",
    "accept-encoding",
    "expect",
    "origin",
    "referer",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
}

# Never towards the client: the upstream's cookies, and the fields the relay sets itself.
_RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "x-request-id", "x-accel-buffering"}

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


Fields = list[tuple[str, str]]  # a head's fields in order, as they go out


def _dropped(always: frozenset[str], fields: Iterable[tuple[str, str]]) -> frozenset[str]:
    """``always``, and the headers that the fields' own ``Connection`` header names."""
    named = [
        token.strip().lower()
        for name, value in fields
        if name.lower() == "connection"
        for token in value.split(",")
    ]
    return always.union(named) if named else always


@functools.cache
def _request_drop(auth_header: str) -> frozenset[str]:
    """What never goes upstream on a route whose key goes in ``auth_header``."""
    return _REQUEST_DROP | {auth_header.lower()}


# Both filters take and give plain (name, value) pairs: a head is written once, in order, and
# a case-insensitive multidict's keys would cost more to build and to format than the few
# lookups it would save (``python -m bench.instructions``).


def upstream_request_headers(
    client: Sequence[tuple[str, str]],
    *,
    auth_header: str,
    auth_value: str,
    request_id: str,
) -> Fields:
    """The header fields sent upstream for a client request."""
    drop = _dropped(_request_drop(auth_header), client)
    out = [(name, value) for name, value in client if name.lower() not in drop]
    out += (
        (auth_header, auth_value),
        ("Accept-Encoding", "identity"),
        ("X-Request-ID", request_id),
    )
    return out


def client_response_headers(upstream: Sequence[tuple[str, str]], *, request_id: str) -> Fields:
    """The header fields sent to the client for an upstream response."""
    drop = _dropped(_RESPONSE_DROP, upstream)
    out = [
        (name, value)
        for name, value in upstream
        if (lower := name.lower()) not in drop and not lower.startswith("access-control-")
    ]
    out += (("X-Accel-Buffering", "no"), ("X-Request-ID", request_id))
    return out


def request_id_from(values: Iterable[str]) -> str:
    """The client's ``X-Request-ID`` when well formed, otherwise a fresh one."""
    for value in values:
        if _REQUEST_ID.fullmatch(value):
            return value
        break
    return next(_fresh_ids)


def _random_ids() -> Iterator[str]:
    """Fresh ids, each as random as ``uuid4().hex``: 16 bytes of the OS's randomness, taken
    for 256 ids at a time (one ``getrandom`` call, not one per request)."""
    while True:
        block = os.urandom(16 * 256).hex()
        for start in range(0, len(block), 32):
            yield block[start : start + 32]


def _reseed() -> None:
    """A forked worker draws ids of its own, never its parent's unused ones."""
    global _fresh_ids
    _fresh_ids = _random_ids()


_fresh_ids = _random_ids()
os.register_at_fork(after_in_child=_reseed)
