"""One timer for many deadlines, checked a few times a second instead of one timer each.

Every stream has deadlines (first byte, idle gap, maximum duration) and every kept-alive
client connection one (the next request). A loop timer each cost a new request three timer
set-ups and two cancellations on its way to the first byte, 15k instructions or a twentieth
of what the relay executed there (counted with callgrind), and kept a timer in memory per
open stream. Deadlines of minutes need no millisecond precision, so a :class:`Sweep` keeps one
timer instead: every ``tick`` seconds, while anything is watched, it calls ``expired(now)``
on each watched object whose ``due`` time has passed. A deadline is then enforced up to one
tick late; :func:`tick_for` makes a tick an eighth of the shortest deadline, and at most a
second.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection
from typing import Protocol

NEVER = math.inf  # the due time of what is not waiting on a deadline
MAX_TICK = 1.0


class Watched(Protocol):
    @property
    def due(self) -> float: ...  # loop time (time.monotonic()) at which to call expired

    def expired(self, now: float) -> None: ...


def tick_for(*deadlines: float) -> float:
    """A tick that enforces the shortest of ``deadlines`` (seconds) to within an eighth."""
    return max(0.001, min(MAX_TICK, min(deadlines) / 8))


class Sweep:
    """Checks the ``due`` time of everything in ``watched`` every ``tick`` seconds, while
    ``watched`` is not empty. Whoever adds to it calls :meth:`wake`."""

    __slots__ = ("_handle", "_watched", "tick")

    def __init__(self, watched: Collection[Watched], tick: float) -> None:
        self._watched = watched
        self.tick = tick
        self._handle: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        """Something was added: make sure the timer runs (a no-op when it does)."""
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.tick, self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        self._handle = None
        if not self._watched:
            return  # idle: the next wake() starts it again
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self.tick, self._run)  # first: whatever expired() does
        now = loop.time()
        for item in [item for item in self._watched if item.due <= now]:
            item.expired(now)  # may remove it from the collection, hence the copy
