"""relay/_speedups.c gives what its Python versions in relay/speedups.py give."""

from __future__ import annotations

import gc
import math
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay import speedups
from relay.speedups import (
    MARKERS,
    ChunkTimesPy,
    EventsPy,
    ForwardPy,
    SwitchPy,
    frame_py,
    plain_event_py,
)

if speedups.COMPILED:
    from relay import _speedups
elif os.environ.get("CI") == "true":
    pytest.fail(
        "relay._speedups was not built (no C compiler?), and CI must test it",
        pytrace=False,
    )
else:
    pytest.skip("relay._speedups was not built (no C compiler?)", allow_module_level=True)

# The pieces SSE chunks are made of, with every byte the scans look for, near misses of the
# markers, and the markers themselves.
PIECES = [
    b"data", b"data:", b": ", b"event: x", b"id: 1", b"x", b" ", b"\n", b"\n\n", b"\r",
    b"\r\n", b"{", b"}", b'"', b"[", b"]", b"b", b"o", b"p", b"_", b"dat", b"\nda",
    b'"type":"progress"', b"[DON", b'"complet', b'"erro"', b"base_res", b"ab" * 40,
    *MARKERS,
]  # fmt: skip


@given(pieces=st.lists(st.sampled_from(PIECES), max_size=16))
@example(pieces=[b"data: x", b"\n\n"])
@example(pieces=[b"\n\n"])
@example(pieces=[b"x", b"\n", b"\n\n"])
def test_plain_event_agrees_with_python(pieces: list[bytes]) -> None:
    """For any chunk, the compiled look settles it as the Python one does."""
    chunk = b"".join(pieces)
    assert _speedups.plain_event(chunk) == plain_event_py(chunk)
    assert _speedups.plain_event(chunk + b"\n\n") == plain_event_py(chunk + b"\n\n")


@pytest.mark.parametrize("marker", MARKERS)
@pytest.mark.parametrize("at", ["start", "middle", "end"])
def test_every_marker_sends_an_event_the_general_way(marker: bytes, at: str) -> None:
    """An event holding a terminal marker anywhere is never settled by the short look."""
    event = {
        "start": marker + b" data: x",
        "middle": b"data: " + marker + b" x",
        "end": b"data: x " + marker,
    }[at]
    assert _speedups.plain_event(event + b"\n\n") == plain_event_py(event + b"\n\n") == -1


@given(chunk=st.binary(max_size=5000))
@example(chunk=b"")
@example(chunk=b"x" * 4095)
@example(chunk=b"x" * 65536)
def test_frame_agrees_with_python(chunk: bytes) -> None:
    """Chunked framing is the same bytes, for every size."""
    assert _speedups.frame(chunk) == frame_py(chunk)


# Binary fractions, so that times built from them differ by exactly a step: steps land on
# the bounds themselves, where bisect_left's side matters, as well as between them.
BOUNDS = (0.125, 0.5, 1.0, 4.0, math.inf)
STEPS = [0.0, 2**-20, 0.125, 0.25, 0.5, 0.625, 1.0, 3.0, 4.0, 2.0**20]


@given(
    chunks=st.lists(st.tuples(st.sampled_from(STEPS), st.sampled_from(STEPS)), max_size=40),
    take_every=st.integers(min_value=1, max_value=50),
)
def test_chunk_times_agree_with_python(chunks: list[tuple[float, float]], take_every: int) -> None:
    """Bins, sums and the first write time are the Python class's exactly, however often
    they are taken, bounds included (each step lands on, just past, or between them)."""
    compiled, python = _speedups.ChunkTimes(BOUNDS, BOUNDS), ChunkTimesPy(BOUNDS, BOUNDS)
    assert compiled.first_written is python.first_written is None
    now = 1000.0
    for i, (gap, forward) in enumerate(chunks, 1):
        now += gap
        compiled.add(now, now + forward)
        python.add(now, now + forward)
        if i % take_every == 0:
            assert compiled.take() == python.take()
    assert compiled.take() == python.take()
    assert compiled.first_written == python.first_written
    assert compiled.take() == python.take() == ([0] * 5, 0.0, [0] * 5, 0.0)


@pytest.mark.parametrize(
    "bounds", [(), (1.0,), (0.5, 1.0), (*(float(i) for i in range(20)), math.inf)]
)
def test_chunk_times_want_bounds_that_end_with_inf(bounds: tuple[float, ...]) -> None:
    """Bounds must end with +inf (every value has a bucket), 20 at most, as in Python."""
    for times_class in (_speedups.ChunkTimes, ChunkTimesPy):
        with pytest.raises(ValueError, match="the last one inf"):
            times_class(bounds, BOUNDS)
        with pytest.raises(ValueError, match="the last one inf"):
            times_class(BOUNDS, bounds)


def test_chunk_times_take_only_floats() -> None:
    """A time that is not a number is a TypeError, and counts nothing."""
    times = _speedups.ChunkTimes(BOUNDS, BOUNDS)
    with pytest.raises(TypeError):
        times.add("1.0", 2.0)
    with pytest.raises(TypeError):
        times.add(1.0)
    assert times.first_written is None
    assert times.take() == ([0] * 5, 0.0, [0] * 5, 0.0)


@pytest.mark.parametrize("function", ["plain_event", "frame"])
def test_only_bytes_are_taken(function: str) -> None:
    """A str or a bytearray is a TypeError, as the per-chunk path only ever has bytes."""
    for wrong in ("data: x\n\n", bytearray(b"data: x\n\n")):
        with pytest.raises(TypeError):
            getattr(_speedups, function)(wrong)


@pytest.fixture(params=["compiled", "python"])
def switch_class(request: pytest.FixtureRequest) -> Callable[..., SwitchPy]:
    return _speedups.Switch if request.param == "compiled" else SwitchPy  # type: ignore[return-value]


def test_a_switch_calls_its_current_target(switch_class: Callable[..., SwitchPy]) -> None:
    """Each call reaches the target set last, with the call's arguments and result; a
    target that replaces itself while it runs finishes its call, and the next call goes to
    its replacement."""
    got: list[object] = []
    switch = switch_class(got.append)
    assert switch(b"a") is None
    switch.target = lambda *args: got.append(args) or "result"
    assert switch(b"b", 2) == "result"

    def detach(chunk: bytes) -> None:
        switch.target = got.append  # the only reference to this function goes here
        got.append(("detached", chunk))

    switch.target = detach
    del detach
    switch(b"c")
    switch(b"d")
    assert got == [b"a", (b"b", 2), ("detached", b"c"), b"d"]
    switch.target = lambda _: 1 / 0
    with pytest.raises(ZeroDivisionError):
        switch(b"e")


def test_a_switch_hands_its_targets_errors_to_on_error(
    switch_class: Callable[..., SwitchPy],
) -> None:
    """With an ``on_error``, what the target raises (an Exception) goes to it, and its
    result is the call's; what it raises propagates, and so does a BaseException. Without
    one (None, the default, or deleted), errors propagate as they are."""

    class Stop(BaseException):
        pass

    def target(what: object) -> object:
        if isinstance(what, BaseException):
            raise what
        return what

    switch = switch_class(target)
    assert switch.on_error is None
    with pytest.raises(KeyError):
        switch(KeyError("k"))
    seen: list[BaseException] = []
    switch.on_error = lambda exc: seen.append(exc) or "handled"
    assert switch("fine") == "fine"
    assert switch(KeyError("k")) == "handled"
    assert [type(exc) for exc in seen] == [KeyError]
    assert seen[0].__traceback__ is not None  # as an except clause would have it
    with pytest.raises(Stop):
        switch(Stop())

    def change_course(what: object) -> object:
        switch.on_error = None  # what this call raises still goes to the one it began with
        return target(what)

    switch.target = change_course
    assert switch(KeyError("late")) == "handled"
    assert [str(exc) for exc in seen[1:]] == ["'late'"]
    switch.target = target

    def refuse(exc: Exception) -> None:
        raise RuntimeError("refused") from exc

    switch.on_error = refuse
    with pytest.raises(RuntimeError, match="refused"):
        switch(ValueError("v"))
    if switch_class is not SwitchPy:
        del switch.on_error  # the compiled switch's None
    else:
        switch.on_error = None
    with pytest.raises(ValueError, match="v"):
        switch(ValueError("v"))


def test_a_switch_always_has_one_target() -> None:
    """The compiled switch takes exactly one target, and its target cannot be deleted."""
    with pytest.raises(TypeError):
        _speedups.Switch()
    with pytest.raises(TypeError):
        _speedups.Switch(print, print)
    switch = _speedups.Switch(print)
    with pytest.raises(AttributeError):
        del switch.target


def test_a_cycle_through_a_switch_is_collected() -> None:
    """A switch whose target refers back to it is found and freed by the collector (the
    relay breaks such cycles itself; the collector is the backstop)."""

    class Owner:
        def __init__(self, through: str) -> None:
            self.switch = _speedups.Switch(print)
            setattr(self.switch, through, self.hold)  # owner -> switch -> bound method

        def hold(self, _: object) -> None:
            pass

    for through in ("target", "on_error"):
        owner = Owner(through)
        gone = weakref.ref(owner)
        del owner
        assert gone() is not None  # a cycle: reference counting alone cannot free it
        gc.collect()
        assert gone() is None, through


def test_the_relay_uses_the_compiled_versions() -> None:
    """Where the module was built, it is what the per-chunk path calls."""
    assert speedups.frame is _speedups.frame
    assert speedups.plain_event is _speedups.plain_event
    assert speedups.ChunkTimes is _speedups.ChunkTimes
    assert speedups.Switch is _speedups.Switch
    assert speedups.Forward is _speedups.Forward
    assert speedups.Events is _speedups.Events


class _Transport:
    """What a Forward writes to: records each write; closing and failing on demand."""

    def __init__(self) -> None:
        self.writes: list[object] = []
        self.closing = False
        self.fails = False

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        if self.fails:
            raise ConnectionResetError("gone mid-write")
        self.writes.append(data)

    def writelines(self, pieces: tuple[bytes, ...]) -> None:
        self.writes.append(tuple(pieces))


class _Upstream:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def pause(self) -> None:
        self.calls.append(("pause",))

    def refuse(self, chunk: bytes, exc: BaseException) -> None:
        self.calls.append(("refuse", chunk, type(exc), str(exc)))


class _Protocol:
    writing_paused = False


class _Exchange:
    bytes_out = 0
    chunks = 0


class _Watchdog:
    last = 0.0


_WATCHDOG = _Watchdog()


class _Gone(ConnectionResetError):
    pass


@pytest.fixture(params=["compiled", "python"])
def forward_class(request: pytest.FixtureRequest) -> Callable[..., ForwardPy]:
    return _speedups.Forward if request.param == "compiled" else ForwardPy  # type: ignore[return-value]


def _forward(
    forward_class: Callable[..., ForwardPy], *, head: bytes, chunked: bool, tapped: bool = True
) -> tuple[ForwardPy, _Transport, _Upstream, _Exchange, list[tuple[float, float]], list[bytes]]:
    """A forward (its `small` is 8 bytes) and what it writes, calls, counts, times and shows."""
    transport, upstream, exchange = _Transport(), _Upstream(), _Exchange()
    times: list[tuple[float, float]] = []
    seen: list[bytes] = []
    forward = forward_class(
        transport, _Protocol(), upstream, exchange, lambda r, w: times.append((r, w)),
        _WATCHDOG, seen.append if tapped else None, _Gone, head, chunked, 8,
    )  # fmt: skip
    return forward, transport, upstream, exchange, times, seen


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "length"])
def test_a_forward_writes_each_chunk_then_records_it(
    forward_class: Callable[..., ForwardPy], chunked: bool
) -> None:
    """The head goes out with the first chunk; chunks are framed as the response is (one
    buffer below `small`, three pieces from it); each is shown to the tap, counted, and
    timed on time.monotonic()'s clock, the write time also being the watchdog's."""
    forward, transport, upstream, exchange, times, seen = _forward(
        forward_class, head=b"HEAD\r\n\r\n", chunked=chunked
    )
    before = time.monotonic()
    for chunk in (b"first", b"small", b"large chunk"):
        assert forward(chunk) is None
    after = time.monotonic()
    if chunked:
        assert transport.writes == [
            b"HEAD\r\n\r\n5\r\nfirst\r\n", b"5\r\nsmall\r\n", (b"b\r\n", b"large chunk", b"\r\n")
        ]  # fmt: skip
    else:
        assert transport.writes == [b"HEAD\r\n\r\nfirst", b"small", b"large chunk"]
    assert forward.head == b""
    assert seen == [b"first", b"small", b"large chunk"]
    assert (exchange.bytes_out, exchange.chunks) == (21, 3)
    assert len(times) == 3
    assert all(before <= received <= written <= after for received, written in times)
    assert _WATCHDOG.last == times[-1][1]
    assert upstream.calls == []


def test_a_forward_with_no_tap_and_an_empty_first_chunk(
    forward_class: Callable[..., ForwardPy],
) -> None:
    """An empty chunk is never framed (its frame would end the body); with no tap, the
    rest of the path runs as usual."""
    forward, transport, _, exchange, times, _ = _forward(
        forward_class, head=b"H", chunked=True, tapped=False
    )
    forward(b"")
    forward(b"x")
    assert transport.writes == [b"H", b"1\r\nx\r\n"]
    assert (exchange.bytes_out, exchange.chunks, len(times)) == (1, 2, 2)


def test_a_forward_pauses_the_upstream_when_the_client_is_full(
    forward_class: Callable[..., ForwardPy],
) -> None:
    forward, transport, upstream, _, _, _ = _forward(forward_class, head=b"", chunked=False)
    forward(b"a")
    forward.protocol.writing_paused = True
    forward(b"b")
    assert transport.writes == [b"a", b"b"]
    assert upstream.calls == [("pause",)]


def test_a_forward_refuses_a_chunk_once_the_client_is_gone(
    forward_class: Callable[..., ForwardPy],
) -> None:
    """Nothing is written, shown, counted or timed: the chunk goes back to the upstream
    with the error the forward was given."""
    forward, transport, upstream, exchange, times, seen = _forward(
        forward_class, head=b"H", chunked=True
    )
    transport.closing = True
    forward(b"data: 1\n\n")
    assert upstream.calls == [("refuse", b"data: 1\n\n", _Gone, "the client went away")]
    assert transport.writes == seen == times == []
    assert (exchange.bytes_out, exchange.chunks, forward.head) == (0, 0, b"H")


def test_a_forward_raises_what_its_write_raises(forward_class: Callable[..., ForwardPy]) -> None:
    forward, transport, _, exchange, times, seen = _forward(forward_class, head=b"", chunked=True)
    transport.fails = True
    with pytest.raises(ConnectionResetError, match="gone mid-write"):
        forward(b"x")
    assert seen == times == []
    assert exchange.chunks == 0


def test_the_compiled_forward_takes_only_bytes_and_a_bytes_head() -> None:
    forward, *_ = _forward(_speedups.Forward, head=b"", chunked=True)  # type: ignore[arg-type]
    for wrong in ("x", bytearray(b"x"), None):
        with pytest.raises(TypeError):
            forward(wrong)
    with pytest.raises(TypeError):
        forward(b"x", b"y")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        forward.head = "HEAD"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        _speedups.Forward(*[None] * 8, "HEAD", True, 8)  # type: ignore[arg-type]


def test_a_cycle_through_a_forward_is_collected() -> None:
    """An upstream that holds its forward, which holds it back, is found and freed by the
    collector (the relay breaks the cycle itself when the exchange ends)."""

    class Upstream:
        sink: object = None

    upstream = Upstream()
    upstream.sink = _speedups.Forward(
        _Transport(), _Protocol(), upstream, _Exchange(), print, _Watchdog(), None, _Gone,
        b"", True, 8,
    )  # fmt: skip
    gone = weakref.ref(upstream)
    del upstream
    assert gone() is not None
    gc.collect()
    assert gone() is None


@pytest.fixture(params=["compiled", "python"])
def events_class(request: pytest.FixtureRequest) -> type[EventsPy]:
    return _speedups.Events if request.param == "compiled" else EventsPy  # type: ignore[return-value]


def test_a_forward_counts_the_usual_event_on_its_tap(
    forward_class: Callable[..., ForwardPy], events_class: type[EventsPy]
) -> None:
    """Written first, then settled: a whole plain event is counted by the tap's fast path
    (compiled, the forward calls it with no call through Python); any other chunk, and
    every chunk while an event is unfinished, goes to the subclass's general path."""
    tap_base: Any = events_class

    class Tap(tap_base):  # type: ignore[misc]
        __slots__ = ("general",)

        def __init__(self) -> None:
            super().__init__()
            self.general: list[bytes] = []

        def _general(self, chunk: bytes) -> None:
            self.general.append(chunk)
            self._pending = chunk if chunk.endswith(b"part") else b""

    tap = Tap()
    transport = _Transport()
    forward = forward_class(
        transport, _Protocol(), _Upstream(), _Exchange(), lambda r, w: None, _WATCHDOG, tap,
        _Gone, b"", False, 8,
    )  # fmt: skip
    chunks = [
        b"data: 1\n\n", b": comment\n\n", b"data: [DONE]\n\n", b"data: 2\n\ndata: 3\n\n",
        b"data: a part", b"data: 4\n\n", b"data: 5\n\n",
    ]  # fmt: skip
    for chunk in chunks:
        forward(chunk)
    assert transport.writes == chunks
    assert tap.events == 2  # "data: 1" and "data: 5"; the comment dispatches nothing
    assert tap.general == [b"data: [DONE]\n\n", b"data: 2\n\ndata: 3\n\n", b"data: a part",
                           b"data: 4\n\n"]  # fmt: skip


def test_the_compiled_event_tap_keeps_bytes_and_needs_its_general_path() -> None:
    tap = _speedups.Events()
    assert (tap._pending, tap.events) == (b"", 0)
    tap(b"data: 1\n\n")
    assert tap.events == 1
    with pytest.raises(AttributeError, match="_general"):
        tap(b"data: [DONE]\n\n")
    with pytest.raises(TypeError):
        tap._pending = "x"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        tap("data: 1\n\n")  # type: ignore[arg-type]


class _SlotExchange:
    __slots__ = ("bytes_out", "chunks")

    def __init__(self) -> None:
        self.bytes_out = self.chunks = 0


class _SlotWatchdog:
    __slots__ = ("last",)


class _SlotProtocol:
    __slots__ = ("writing_paused",)

    def __init__(self) -> None:
        self.writing_paused = False


class _Watched:
    """An exchange whose class sets attributes its own way: each set is seen."""

    bytes_out = chunks = 0

    def __init__(self) -> None:
        object.__setattr__(self, "sets", [])

    def __setattr__(self, name: str, value: object) -> None:
        self.sets.append(name)  # type: ignore[attr-defined]
        object.__setattr__(self, name, value)


def test_a_forward_keeps_its_books_on_slotted_objects_as_on_any(
    forward_class: Callable[..., ForwardPy],
) -> None:
    """The relay's exchange, watchdog and protocol keep these attributes in __slots__, which
    the compiled forward reads and writes in place; a class that sets attributes its own
    way still sees every set, and an attribute never set is an AttributeError, as for the
    Python twin."""
    transport, upstream, exchange, watchdog = (
        _Transport(),
        _Upstream(),
        _SlotExchange(),
        _SlotWatchdog(),
    )
    protocol = _SlotProtocol()
    times: list[tuple[float, float]] = []
    forward = forward_class(
        transport, protocol, upstream, exchange, lambda r, w: times.append((r, w)), watchdog,
        None, _Gone, b"", True, 8,
    )  # fmt: skip
    forward(b"abc")
    protocol.writing_paused = True
    forward(b"defgh")
    assert (exchange.bytes_out, exchange.chunks) == (8, 2)
    assert watchdog.last == times[-1][1]
    assert upstream.calls == [("pause",)]

    watched = _Watched()
    forward = forward_class(
        transport, _SlotProtocol(), upstream, watched, lambda r, w: None, _SlotWatchdog(),
        None, _Gone, b"", True, 8,
    )  # fmt: skip
    forward(b"x")
    assert watched.sets == ["bytes_out", "chunks"]
    assert (watched.bytes_out, watched.chunks) == (1, 1)

    unset = _SlotExchange()
    del unset.chunks
    forward = forward_class(
        transport, _SlotProtocol(), upstream, unset, lambda r, w: None, _SlotWatchdog(),
        None, _Gone, b"", True, 8,
    )  # fmt: skip
    with pytest.raises(AttributeError, match="chunks"):
        forward(b"y")
    assert unset.bytes_out == 1  # counted before the chunk count failed, as in Python


def test_a_tap_that_overrides_its_call_is_called_through_it(
    forward_class: Callable[..., ForwardPy], events_class: type[EventsPy]
) -> None:
    """The compiled forward settles an event tap's usual chunk itself only when the tap's
    class keeps the fast path's call; an override is called like any other tap."""
    tap_base: Any = events_class

    class Counting(tap_base):  # type: ignore[misc]
        __slots__ = ("seen",)

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[bytes] = []

        def __call__(self, chunk: bytes) -> None:
            self.seen.append(chunk)

    tap = Counting()
    forward = forward_class(
        _Transport(), _Protocol(), _Upstream(), _Exchange(), lambda r, w: None, _WATCHDOG,
        tap, _Gone, b"", False, 8,
    )  # fmt: skip
    forward(b"data: 1\n\n")
    assert tap.seen == [b"data: 1\n\n"]
    assert tap.events == 0
