"""One timer for many deadlines (``relay.sweep``), and the stream watchdog it drives."""

from __future__ import annotations

import asyncio

import pytest

from relay.exchange import IDLE_TIMEOUT, MAX_DURATION, TTFB_TIMEOUT
from relay.pump import Watchdog
from relay.sweep import MAX_TICK, NEVER, Sweep, tick_for
from tests.conftest import step


def test_a_tick_is_an_eighth_of_the_shortest_deadline_and_at_most_a_second() -> None:
    assert tick_for(0.4, 10.0) == pytest.approx(0.05)
    assert tick_for(300.0, 120.0, 3600.0) == MAX_TICK
    assert tick_for(0.0) > 0  # never a busy loop


class Item:
    def __init__(self, watched: set[Item], due: float) -> None:
        self.watched = watched
        self.due = due
        self.seen: asyncio.Queue[float] = asyncio.Queue()

    def expired(self, now: float) -> None:
        self.watched.discard(self)  # what a closed connection does: it leaves the set
        self.seen.put_nowait(now)


async def test_the_sweep_expires_what_is_due_and_nothing_else() -> None:
    loop = asyncio.get_running_loop()
    watched: set[Item] = set()
    sweep = Sweep(watched, tick=0.01)
    due, waiting = Item(watched, loop.time() + 0.03), Item(watched, NEVER)
    watched |= {due, waiting}
    sweep.wake()
    sweep.wake()  # a second wake arms nothing more
    expired_at = await step(due.seen.get())
    assert expired_at >= due.due
    assert watched == {waiting}
    assert waiting.seen.empty()
    sweep.stop()


class CountedSweep(Sweep):
    __slots__ = ("runs",)

    def __init__(self, watched: set[Item], tick: float) -> None:
        super().__init__(watched, tick)
        self.runs: asyncio.Queue[bool] = asyncio.Queue()

    def _run(self) -> None:
        super()._run()
        self.runs.put_nowait(self._handle is not None)  # whether it armed the next run


async def test_the_sweep_stops_when_nothing_is_watched_and_a_wake_restarts_it() -> None:
    loop = asyncio.get_running_loop()
    watched: set[Item] = set()
    sweep = CountedSweep(watched, tick=0.01)
    first = Item(watched, loop.time())
    watched.add(first)
    sweep.wake()
    await step(first.seen.get())  # it left the set as it expired
    assert await step(sweep.runs.get()) is True  # that run looks once more
    assert await step(sweep.runs.get()) is False  # and that one finds nothing: no timer
    again = Item(watched, loop.time())
    watched.add(again)
    sweep.wake()
    await step(again.seen.get())
    sweep.stop()


async def _watchdog(**deadlines: float) -> tuple[Watchdog, asyncio.Task[None]]:
    """A watchdog guarding a task that waits forever (as a stream's handler would)."""
    made: asyncio.Future[Watchdog] = asyncio.get_running_loop().create_future()

    async def guarded() -> None:
        made.set_result(Watchdog(started=0.0, **deadlines))
        await asyncio.Event().wait()

    task = asyncio.create_task(guarded())
    return await step(made), task


async def _cut(task: asyncio.Task[None]) -> None:
    with pytest.raises(asyncio.CancelledError):
        await step(task)


@pytest.mark.parametrize(
    ("first_byte", "max_duration", "outcome"),
    [(5.0, 60.0, TTFB_TIMEOUT), (50.0, 10.0, MAX_DURATION)],
    ids=["first-byte", "first-byte-past-the-maximum"],
)
async def test_no_first_byte_by_the_earlier_deadline_cuts_the_stream(
    first_byte: float, max_duration: float, outcome: str
) -> None:
    watchdog, task = await _watchdog(first_byte=first_byte, idle=2.0, max_duration=max_duration)
    due = min(first_byte, max_duration)
    assert watchdog.due == due
    watchdog.expired(due)
    await _cut(task)
    assert watchdog.claim() == outcome
    assert watchdog.due == NEVER


async def test_the_idle_gap_counts_from_the_last_chunk() -> None:
    watchdog, task = await _watchdog(first_byte=5.0, idle=2.0, max_duration=60.0)
    watchdog.streaming(1.0)
    assert watchdog.due == 3.0
    watchdog.last = 2.5  # a chunk came: what the forwarder records
    watchdog.expired(3.0)
    assert not task.done()
    assert watchdog.due == 4.5  # looked at again two seconds after that chunk
    watchdog.expired(4.5)
    await _cut(task)
    assert watchdog.claim() == IDLE_TIMEOUT


async def test_a_stopped_watchdog_is_never_due() -> None:
    watchdog, task = await _watchdog(first_byte=5.0, idle=2.0, max_duration=60.0)
    watchdog.stop()
    assert watchdog.due == NEVER
    task.cancel()
    await _cut(task)
    assert watchdog.claim() is None  # cut by someone else: not ours to claim


class Failing(Item):
    def expired(self, now: float) -> None:
        super().expired(now)
        raise LookupError("a bug in one watched object")


async def test_one_failing_object_does_not_stop_the_sweep() -> None:
    """What an ``expired`` raises goes to the loop's handler; the next tick still runs."""
    loop = asyncio.get_running_loop()
    errors: asyncio.Queue[object] = asyncio.Queue()
    loop.set_exception_handler(lambda _, context: errors.put_nowait(context.get("exception")))
    try:
        watched: set[Item] = set()
        sweep = Sweep(watched, tick=0.01)
        failing = Failing(watched, loop.time())
        watched.add(failing)
        sweep.wake()
        assert isinstance(await step(errors.get()), LookupError)
        later = Item(watched, loop.time())
        watched.add(later)  # no wake(): the sweep must still be running
        await step(later.seen.get())
        sweep.stop()
    finally:
        loop.set_exception_handler(None)
