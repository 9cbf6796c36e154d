"""Pure header filtering in both directions: what crosses the relay, what never does.

Towards the upstream the client's credentials, cookies, hop-by-hop headers (and any header
the ``Connection`` header names), forwarding headers and the framing headers are dropped;
the provider key is injected and ``Accept-Encoding: identity`` asked for, so the bytes are
never compressed on the way to us and never decompressed by us.

Towards the client the upstream's hop-by-hop headers, ``Set-Cookie`` and its CORS headers
(the relay answers CORS for its own origins) are dropped;
everything else, ``Content-Type``, ``Content-Length`` and ``Content-Encoding`` included,
passes unchanged because the body passes unchanged.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

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

_RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "x-request-id"}

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _dropped(
    always: frozenset[str], headers: CIMultiDictProxy[str] | CIMultiDict[str]
) -> frozenset[str]:
    """``always``, and the headers that ``headers``' own ``Connection`` header names."""
    if "Connection" not in headers:
        return always
    return always.union(
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    )


@functools.cache
def _request_drop(auth_header: str) -> frozenset[str]:
    """What never goes upstream on a route whose key goes in ``auth_header``."""
    return _REQUEST_DROP | {auth_header.lower()}


def upstream_request_headers(
    client: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    auth_header: str,
    auth_value: str,
    request_id: str,
) -> CIMultiDict[str]:
    """The headers sent upstream for a client request."""
    drop = _dropped(_request_drop(auth_header), client)
    out: CIMultiDict[str] = CIMultiDict(
        [(name, value) for name, value in client.items() if name.lower() not in drop]
    )
    out[auth_header] = auth_value
    out["Accept-Encoding"] = "identity"
    out["X-Request-ID"] = request_id
    return out


def client_response_headers(
    upstream: CIMultiDictProxy[str] | CIMultiDict[str], *, request_id: str
) -> CIMultiDict[str]:
    """The headers sent to the client for an upstream response."""
    drop = _dropped(_RESPONSE_DROP, upstream)
    out: CIMultiDict[str] = CIMultiDict(
        [
            (name, value)
            for name, value in upstream.items()
            if (lower := name.lower()) not in drop and not lower.startswith("access-control-")
        ]
    )
    out["X-Accel-Buffering"] = "no"
    out["X-Request-ID"] = request_id
    return out


def request_id_from(values: Iterable[str]) -> str:
    """The client's ``X-Request-ID`` when well formed, otherwise a fresh one."""
    for value in values:
        if _REQUEST_ID.fullmatch(value):
            return value
        break
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID
