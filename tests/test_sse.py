"""The SSE tap: event counting across chunk boundaries and terminal recognition."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import relay.speedups
from relay import sse
from relay.speedups import EventsPy, plain_event_py
from relay.sse import HEAD, TAIL, SseTap, classify


class SseTapPy(sse._Tap, EventsPy):
    """The tap on its pure-Python fast path (the relay's, where no C compiler was found)."""

    __slots__ = ("terminal",)


@pytest.fixture(scope="module", autouse=True, params=["as installed", "pure Python"])
def _scans(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test here runs with the tap as installed (its fast path compiled, where it
    was built) and again with the pure-Python one."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "pure Python":
            patch.setattr(relay.speedups, "plain_event", plain_event_py)
            patch.setitem(globals(), "SseTap", SseTapPy)
        yield


MINIMAX_AUDIO = b'data: {"data":{"audio":"00ff","status":1},"base_resp":{"status_code":0}}'
MINIMAX_FINAL = (
    b'data: {"data":{"audio":"","status":2},"base_resp":{"status_code":0,"status_msg":"success"}}'
)
MINIMAX_ERROR = b'data: {"data":null,"base_resp":{"status_code":1004,"status_msg":"auth failed"}}'


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (b"data: [DONE]", "done"),
        (b"data:[DONE]", "done"),
        (b'data: {"choices":[{"delta":{"content":"[DONE]"}}]}', None),
        (b'data: {"type": "progress", "percentage": 50}', None),
        (b'data: {"type": "complete", "outputs": ["https://x"]}', "complete"),
        (b'data: {"type":"error","error":"boom"}', "error"),
        (b'data: {"type": "output", "text": "complete"}', None),
        (MINIMAX_AUDIO, None),
        (MINIMAX_FINAL, "complete"),
        (MINIMAX_ERROR, "error"),
        (b"event: message\ndata: [DONE]", "done"),
    ],
)
def test_terminal_events_are_recognised(event: bytes, kind: str | None) -> None:
    """Each provider's terminal event maps to its kind; ordinary events to none."""
    assert classify(event) == kind


STREAM = (
    b": comment only, not an event\n\n"
    + b"".join(b'data: {"type":"progress","percentage":%d}\n\n' % p for p in range(0, 100, 25))
    + b'data: {"type":"complete","outputs":[]}\n\n'
)


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_events_are_counted_however_the_stream_is_cut(cuts: list[int]) -> None:
    """Chunk boundaries anywhere, even inside a separator, change nothing."""
    tap = SseTap()
    edges = [0, *sorted(cuts), len(STREAM)]
    for start, end in itertools.pairwise(edges):
        tap(STREAM[start:end])
    assert tap.events == 5
    assert tap.terminal == "complete"


def test_crlf_streams_are_understood() -> None:
    """CRLF line ends delimit events like LF ones."""
    tap = SseTap()
    tap(b"data: a\r\n\r\ndata: [DONE]\r\n\r\n")
    assert (tap.events, tap.terminal) == (2, "done")


def test_a_stream_without_its_terminal_reports_none() -> None:
    """A stream cut after ordinary events, or mid-event, has terminal none."""
    tap = SseTap()
    tap(MINIMAX_AUDIO + b"\n\n" + MINIMAX_FINAL[:40])
    assert (tap.events, tap.terminal) == (1, "none")


def test_the_last_terminal_wins() -> None:
    """An error after a done marker is what the stream ended with."""
    tap = SseTap()
    tap(b"data: [DONE]\n\n" + MINIMAX_ERROR + b"\n\n")
    assert tap.terminal == "error"


def test_an_oversized_event_is_bounded_and_still_classified() -> None:
    """A huge event keeps only its head and tail, yet its final status is still seen."""
    tap = SseTap()
    tap(b'data: {"data":{"audio":"')
    for _ in range(64):
        tap(b"ab" * 8192)
        assert len(tap._pending) <= HEAD + TAIL
    tap(b'","status":2},"base_resp":{"status_code":0}}\n\n')
    assert (tap.events, tap.terminal) == (1, "complete")


EVENTS = [
    b'data: {"type":"progress","percentage":5}',
    b'data: {"type":"complete","outputs":[]}',
    b'data: {"type":"error","error":"boom"}',
    b'data: {"text":"the word complete"}',
    b"data: [DONE]",
    b"data:[DONE]",
    b": a comment",
    b"event: ping",
    b"id: 7\ndata: two lines\ndata: of data",
    b"data",
    b"\ndata: after a blank line",
    b"data: cr\r\ndata: lines",
    MINIMAX_AUDIO,
    MINIMAX_FINAL,
    MINIMAX_ERROR,
]


@given(events=st.lists(st.sampled_from(EVENTS), max_size=12))
def test_one_chunk_per_event_reads_like_one_chunk_for_all(events: list[bytes]) -> None:
    """The shortcut for a chunk holding exactly one event agrees with the general path."""
    per_event, at_once = SseTap(), SseTap()
    for event in events:
        per_event(event + b"\n\n")
    at_once(b"".join(event + b"\n\n" for event in events))
    assert (per_event.events, per_event.terminal) == (at_once.events, at_once.terminal)
    assert per_event.at_boundary
    assert at_once.at_boundary
