"""Limits shared by every replica, in Redis (``RELAY_REDIS_URL``).

Each decision is one Lua script, so it is atomic, and uses Redis's own clock, so replicas
with skewed clocks agree. Keys expire by themselves. Stream slots are leases: a sorted set
per client scored by expiry; a live replica renews its leases every ``LEASE_SECONDS / 3``,
so the slots of a replica that died free themselves within ``LEASE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as redis

LEASE_SECONDS = 30.0
PREFIX = "relay:"

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6 "

_HIT = (
    _NOW
    + """
local interval, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * capacity
if now < allow_at then return tostring(allow_at - now) end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1)
return '0'
"""
)

_ACQUIRE = (
    _NOW
    + """
local limit, lease, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, lease)
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
return 1
"""
)

_RENEW = (
    _NOW
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[i - 1], 'XX', now + ttl, ARGV[i])
  redis.call('EXPIRE', KEYS[i - 1], math.ceil(ttl) + 1)
end
return 1
"""
)


class RedisStore:
    """The :class:`relay.limits.Store` shared through Redis."""

    def __init__(self, url: str, *, lease_seconds: float = LEASE_SECONDS) -> None:
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        self._hit = self._redis.register_script(_HIT)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._lease_seconds = lease_seconds
        self._held: dict[str, str] = {}  # lease -> slot key, renewed while held
        self._tasks: set[asyncio.Future[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._redis.ping()
        self._renewer = asyncio.create_task(self._renew_forever(), name="relay-lease-renewer")

    async def hit(self, key: str, interval: float, capacity: int) -> float:
        result = await self._hit(keys=[f"{PREFIX}rate:{key}"], args=[interval, capacity])
        return float(result)

    async def acquire(self, key: str, limit: int) -> str | None:
        lease = uuid.uuid4().hex
        slot_key = f"{PREFIX}slots:{key}"
        if not await self._acquire(keys=[slot_key], args=[limit, lease, self._lease_seconds]):
            return None
        self._held[lease] = slot_key
        return lease

    def release(self, key: str, lease: str) -> None:
        slot_key = self._held.pop(lease, None)
        if slot_key is not None:
            self._spawn(self._redis.zrem(slot_key, lease))

    async def remember(self, task_id: str, owner: str, ttl: float) -> None:
        await self._redis.set(f"{PREFIX}task:{task_id}", owner, px=int(ttl * 1000))

    async def owner(self, task_id: str) -> str | None:
        value = await self._redis.get(f"{PREFIX}task:{task_id}")
        if isinstance(value, bytes):
            return value.decode()
        return value

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            if self._held:
                leases = list(self._held.items())
                with contextlib.suppress(redis.RedisError):
                    await self._renew(
                        keys=[key for _, key in leases],
                        args=[self._lease_seconds, *(lease for lease, _ in leases)],
                    )
