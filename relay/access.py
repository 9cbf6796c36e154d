"""Who is calling: client credentials, the client's identity, and what it may do.

Pure logic over header values and the configuration; no aiohttp. A :class:`Principal` is
the answer: the client's id (what limits and prediction ownership key on) and the optional
narrowing a relay token carries. Token claims only ever narrow: ``models`` is intersected
with the allowlist, ``rpm`` and ``streams`` lower the configured limits, ``origins`` narrows
the allowed origins.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from relay.config import Config, IPNetwork
from relay.errors import OriginNotAllowed, Unauthorized
from relay.policy import Allowlist, is_valid_pattern

ALGORITHM = "HS256"  # pinned: the token's own "alg" header is never trusted
LEEWAY_SECONDS = 30
ADDRESSES_KEPT = 4096  # principals kept for clients known by address alone


@dataclass(frozen=True, slots=True)
class Principal:
    """An identified client and the narrowing its credential carries."""

    id: str  # "token:<sub>", "key:<name>" or "ip:<address>"
    models: Allowlist | None = None
    origins: tuple[str, ...] | None = None
    rpm: int | None = None
    streams: int | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or self.models.allows(model)


class Authenticator:
    """Checks the client credential the configuration asks for."""

    def __init__(self, config: Config) -> None:
        self._modes = config.client_auth
        self._secret = config.token_secret
        self._keys = config.client_keys
        self._trusted = config.trusted_proxies
        # Without client auth a client is its address, and its principal the same every
        # time: kept, it is one lookup instead of a frozen dataclass per request.
        self._by_address: dict[str, Principal] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._modes)

    def authenticate(
        self, authorization: str | None, peer: str | None, forwarded_for: Sequence[str]
    ) -> Principal:
        if not self._modes:
            address = client_address(peer, forwarded_for, self._trusted)
            principal = self._by_address.get(address)
            if principal is None:
                if len(self._by_address) >= ADDRESSES_KEPT:
                    self._by_address.clear()
                principal = self._by_address[address] = Principal(id=f"ip:{address}")
            return principal
        scheme, _, credential = (authorization or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthorized("a relay token or client key is required (Authorization: Bearer)")
        if "token" in self._modes and credential.count(".") == 2:
            return self._token(credential)
        if "key" in self._modes:
            return self._key(credential)
        raise Unauthorized("invalid relay token")

    def _token(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub"]},
                leeway=LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("relay token expired") from None
        except jwt.PyJWTError:
            raise Unauthorized("invalid relay token") from None
        return _narrowed(claims)

    def _key(self, key: str) -> Principal:
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = None
        for name, stored in self._keys:  # every entry is compared: no early exit
            if hmac.compare_digest(digest, stored):
                found = name
        if found is None:
            raise Unauthorized("invalid client key")
        return Principal(id=f"key:{found}")


def _narrowed(claims: dict[str, Any]) -> Principal:
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub or len(sub) > 200:
        raise Unauthorized("invalid relay token: bad sub")
    models = claims.get("models")
    if models is not None and (
        not isinstance(models, list)
        or not all(isinstance(m, str) and is_valid_pattern(m) for m in models)
    ):
        raise Unauthorized("invalid relay token: models must be a list of model ids")
    origins = claims.get("origins")
    if origins is not None and (
        not isinstance(origins, list) or not all(isinstance(o, str) for o in origins)
    ):
        raise Unauthorized("invalid relay token: origins must be a list")
    limits = {}
    for name in ("rpm", "streams"):
        value = claims.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise Unauthorized(f"invalid relay token: {name} must be a positive integer")
        limits[name] = value
    return Principal(
        id=f"token:{sub}",
        models=None if models is None else Allowlist(tuple(models)),
        origins=None if origins is None else tuple(o.rstrip("/") for o in origins),
        rpm=limits["rpm"],
        streams=limits["streams"],
    )


def mint_token(
    secret: str,
    sub: str,
    ttl: float,
    *,
    models: Sequence[str] | None = None,
    origins: Sequence[str] | None = None,
    rpm: int | None = None,
    streams: int | None = None,
    now: float | None = None,
) -> str:
    """A relay token, as an app backend would mint one (``relay token`` uses this)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + int(ttl)}
    optional = {"models": models, "origins": origins, "rpm": rpm, "streams": streams}
    claims.update(
        {k: list(v) if isinstance(v, list | tuple) else v for k, v in optional.items() if v}
    )
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def check_origin(
    origin: str | None, allowed: tuple[str, ...], own_origin: str, principal: Principal | None
) -> None:
    """Refuse a browser origin that is not allowed (a missing Origin is not a browser's)."""
    if origin is None:
        return
    origin = origin.rstrip("/")
    if origin != own_origin and origin not in allowed:
        raise OriginNotAllowed(f"origin {origin!r} is not allowed by this relay")
    if principal is not None and principal.origins is not None and origin not in principal.origins:
        raise OriginNotAllowed(f"this token is not valid from origin {origin!r}")


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: tuple[IPNetwork, ...]
) -> str:
    """The client's address: X-Forwarded-For is believed only hop by hop from trusted proxies."""
    address = peer or "-"
    if not trusted or not _trusted(address, trusted):
        return address
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        address = hop
        if not _trusted(hop, trusted):
            break
    return address


def _trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)
