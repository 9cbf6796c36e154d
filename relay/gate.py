"""Admission: who may call, from where, and how much, decided before any upstream contact.

Order: origin (403), credential (401), then, once the route is known, the request rate
(429), the process-wide stream cap (503) and the client's concurrent streams (429). A
stream's slot is a lease given back in the handler's ``finally``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import structlog
from redis import RedisError

from relay import cors
from relay.access import Authenticator, Principal, check_origin
from relay.config import Config
from relay.errors import NotFound, Overloaded, RateLimited
from relay.limits import Store
from relay.policy import Target

if TYPE_CHECKING:
    from relay.front import Request

logger = structlog.get_logger("relay.gate")


class Gate:
    def __init__(self, config: Config, store: Store) -> None:
        self._config = config
        self._store = store
        self._auth = Authenticator(config)
        count, window = config.rate_limit
        self._interval, self._capacity = window / count, count

    def identify(self, request: Request) -> Principal:
        origin = request.headers.get("Origin")  # none: not a browser's request
        own = ""
        if origin is not None:
            own = cors.own_origin(request)
            check_origin(origin, self._config.allowed_origins, own, None)
        principal = self._auth.authenticate(
            request.headers.get("Authorization"),
            request.remote,
            request.headers.getall("X-Forwarded-For", ()),
        )
        if origin is not None and principal.origins is not None:  # a token narrows them
            check_origin(origin, self._config.allowed_origins, own, principal)
        return principal

    async def admit(self, principal: Principal, target: Target, open_streams: int) -> str | None:
        """Apply the limits; returns the stream slot's lease to release, if one was taken."""
        interval, capacity = self._interval, self._capacity
        if principal.rpm is not None and 60.0 / principal.rpm > interval:
            interval, capacity = 60.0 / principal.rpm, min(capacity, principal.rpm)
        try:
            retry_after = await self._store.hit(principal.id, interval, capacity)
            if retry_after > 0:
                raise RateLimited(
                    "request rate limit reached", retry_after=max(1, math.ceil(retry_after))
                )
            if not target.takes_slot:
                return None
            if open_streams >= self._config.max_streams:
                raise Overloaded("the relay is at its stream capacity", retry_after=1)
            limit = self._config.max_streams_per_client
            if principal.streams is not None:
                limit = min(limit, principal.streams)
            lease = await self._store.acquire(principal.id, limit)
        except RedisError as exc:
            logger.error("limit_state_unavailable", error=type(exc).__name__)
            raise Overloaded("limit state unavailable", retry_after=1) from None
        if lease is None:
            raise RateLimited(f"at most {limit} concurrent streams per client", retry_after=1)
        return lease

    async def check_owner(self, principal: Principal, task_id: str) -> None:
        """Only the client that submitted a task may poll it; anyone else gets 404."""
        try:
            owner = await self._store.owner(task_id)
        except RedisError as exc:
            logger.error("limit_state_unavailable", error=type(exc).__name__)
            raise Overloaded("ownership state unavailable", retry_after=1) from None
        if owner != principal.id:
            raise NotFound("no prediction with this id was submitted by this client")

    async def record_owner(self, principal: Principal, task_id: str, ttl: float) -> None:
        """Remember a submission's owner. A failure is logged, never turned against the
        submission itself, which has already been answered."""
        try:
            await self._store.remember(task_id, principal.id, ttl)
        except RedisError as exc:
            logger.error("ownership_not_recorded", task_id=task_id, error=type(exc).__name__)
