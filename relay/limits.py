"""Per-client limits: request rate (GCRA), concurrent stream slots, prediction ownership.

:func:`gcra` is the pure rate decision, the same arithmetic the Redis store runs in Lua.
:class:`MemoryStore` keeps the state of one process; ``relay.redis_store.RedisStore`` keeps
it in Redis so every replica enforces one limit. Both satisfy :class:`Store`.

Releasing a slot and recording an owner never wait on the network inside a request's
``finally`` (where the handler may be cancelled): the Redis store schedules that work on
tasks it keeps and awaits them on close.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


def gcra(
    tat: float | None, now: float, interval: float, capacity: int
) -> tuple[float | None, float]:
    """Generic cell rate algorithm: ``capacity`` requests per ``interval * capacity`` seconds.

    ``tat`` is the stored theoretical arrival time. Returns ``(new_tat, 0)`` when the request
    is allowed, ``(None, retry_after_seconds)`` when it is not (nothing to store).
    """
    new_tat = max(tat if tat is not None else now, now) + interval
    allow_at = new_tat - interval * capacity
    if now < allow_at:
        return None, allow_at - now
    return new_tat, 0.0


class Store(Protocol):
    async def hit(self, key: str, interval: float, capacity: int) -> float:
        """Count a request; 0 if allowed, else the seconds until one would be."""
        ...

    async def acquire(self, key: str, limit: int) -> str | None:
        """Take one of ``limit`` slots; a lease id, or None when all are held."""
        ...

    def release(self, key: str, lease: str) -> None:
        """Give a slot back (never blocks)."""
        ...

    async def remember(self, task_id: str, owner: str, ttl: float) -> None: ...

    async def owner(self, task_id: str) -> str | None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Limits for one process. ``clock`` is injectable for boundary tests."""

    MAX_TASKS = 1_000_000  # ownership records kept at most (oldest dropped first)

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._slots: dict[str, set[str]] = {}
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._leases = itertools.count()

    async def hit(self, key: str, interval: float, capacity: int) -> float:
        now = self._clock()
        if len(self._tat) > 100_000:  # forget clients whose bucket is full again
            self._tat = {k: t for k, t in self._tat.items() if t > now}
        new_tat, retry_after = gcra(self._tat.get(key), now, interval, capacity)
        if new_tat is not None:
            self._tat[key] = new_tat
        return retry_after

    async def acquire(self, key: str, limit: int) -> str | None:
        held = self._slots.setdefault(key, set())
        if len(held) >= limit:
            return None
        lease = str(next(self._leases))  # unique within this store, which is all it needs
        held.add(lease)
        return lease

    def release(self, key: str, lease: str) -> None:
        held = self._slots.get(key)
        if held is not None:
            held.discard(lease)
            if not held:
                del self._slots[key]

    async def remember(self, task_id: str, owner: str, ttl: float) -> None:
        self._expire()
        self._owners[task_id] = (owner, self._clock() + ttl)
        self._owners.move_to_end(task_id)
        while len(self._owners) > self.MAX_TASKS:
            self._owners.popitem(last=False)

    async def owner(self, task_id: str) -> str | None:
        self._expire()
        entry = self._owners.get(task_id)
        return entry[0] if entry is not None else None

    def _expire(self) -> None:
        now = self._clock()
        while self._owners:
            task_id, (_, expires) = next(iter(self._owners.items()))
            if expires > now:
                break
            del self._owners[task_id]

    async def close(self) -> None:
        pass
