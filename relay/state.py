"""Typed application state: what the relay finds on its ``app``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from relay.config import Config
from relay.gate import Gate
from relay.limits import Store
from relay.metrics import RelayMetrics
from relay.routes import Router
from relay.sweep import Sweep, tick_for
from relay.upstream import Upstreams

if TYPE_CHECKING:
    from relay.pump import Watchdog


@dataclass(slots=True)
class AppState:
    """Everything one relay app owns. Built by ``create_app``; its cleanup ctx closes the
    upstream pool."""

    config: Config
    metrics: RelayMetrics
    store: Store
    gate: Gate
    router: Router
    upstreams: Upstreams
    streams: set[Watchdog] = field(default_factory=set)
    draining: bool = False
    _all_closed: asyncio.Event | None = None  # made by a wait, set when the last stream ends
    deadlines: Sweep = field(init=False)  # checks every open stream's watchdog

    def __post_init__(self) -> None:
        config = self.config
        tick = tick_for(config.first_byte_timeout, config.idle_timeout, config.max_stream_seconds)
        self.deadlines = Sweep(self.streams, tick)

    def stream_opened(self, watchdog: Watchdog) -> None:
        self.streams.add(watchdog)
        self.deadlines.wake()

    def stream_closed(self, watchdog: Watchdog) -> None:
        self.streams.discard(watchdog)
        if not self.streams and self._all_closed is not None:
            self._all_closed.set()

    async def wait_streams_closed(self, grace: float) -> bool:
        """Wait until no stream is open; False if ``grace`` seconds ran out first."""
        if not self.streams:
            return True
        if self._all_closed is None or self._all_closed.is_set():
            self._all_closed = asyncio.Event()
        try:
            async with asyncio.timeout(grace):
                await self._all_closed.wait()
        except TimeoutError:
            return False
        return True

    def cut_streams(self, outcome: str) -> int:
        """Cut every open stream now (the drain grace ran out); returns how many."""
        streams = list(self.streams)
        for watchdog in streams:
            watchdog.expire(outcome)
        return len(streams)


STATE = web.AppKey("relay_state", AppState)
