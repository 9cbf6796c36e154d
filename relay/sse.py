"""A passive tap on ``text/event-stream`` responses: counts events, recognises terminals.

It sees each chunk only after the chunk was written to the client, never changes or holds
back the bytes, and keeps at most one partial event (bounded: the head and tail of an
oversized event) to find event boundaries that span chunks.

Terminal events, the last one seen wins:

- ``done``: an event whose data is ``[DONE]`` (OpenAI-style streams);
- ``complete`` / ``error``: WaveSpeed's ``"type": "complete"`` / ``"type": "error"``;
- MiniMax: a final status event (``"status": 2``) is ``complete``; a non-zero
  ``base_resp.status_code`` is ``error``.

A stream that ends without any of them reports ``none``: truncated, even if the transport
ended cleanly.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from relay.speedups import Events, marked

NONE = "none"

# Cheap byte checks first; a regex runs only on events that pass them.
_TYPE = re.compile(rb'"type"\s*:\s*"(complete|error)"')
_MINIMAX_ERROR = re.compile(rb'"status_code"\s*:\s*-?[1-9]')
_MINIMAX_FINAL = re.compile(rb'"status"\s*:\s*2\b')
_DONE = re.compile(rb"(?:^|\n)data:[ ]?\[DONE\][ \t]*(?:\n|$)")

HEAD = TAIL = 32 * 1024  # what is kept of one event larger than HEAD + TAIL


def classify(event: bytes) -> str | None:
    """The terminal kind of one complete event (newline-normalised), or None."""
    if b"[DONE]" in event and _DONE.search(event):
        return "done"
    if b'"type"' in event and (match := _TYPE.search(event)):
        return match.group(1).decode()
    if b"base_resp" in event:
        if _MINIMAX_ERROR.search(event):
            return "error"
        if _MINIMAX_FINAL.search(event):
            return "complete"
    return None


class _Tap:
    """What the tap does beyond its fast path: see :class:`SseTap`."""

    if not TYPE_CHECKING:  # no instance dict; mypy reads the attributes below instead
        __slots__ = ()
    _pending: bytes  # the fast path's (relay.speedups.Events)
    events: int
    terminal: str  # SseTap's

    def __init__(self) -> None:
        super().__init__()
        self.terminal = NONE

    @property
    def at_boundary(self) -> bool:
        """Whether everything forwarded so far ends on an event boundary."""
        return not self._pending

    def _general(self, chunk: bytes) -> None:
        """Any chunk: CR line ends, several events, a part of one, terminal markers."""
        if chunk.partition(b"\r")[1]:  # CRLF and CR line ends, for the tap's eyes only
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n\n")
        if end == -1:  # still inside one event
            self._pending = _bounded(data)
            return
        self._pending = _bounded(data[end + 2 :]) if end + 2 < len(data) else b""
        whole = data[:end]  # every event this chunk completes
        any_marked = marked(whole)  # one look for the markers per chunk, not per event
        for event in whole.split(b"\n\n"):
            if not (event[:4] == b"data" or event.partition(b"\ndata")[1]):
                continue  # comments and field-only blocks dispatch no event
            self.events += 1
            if any_marked and (kind := classify(event)) is not None:
                self.terminal = kind


def _bounded(rest: bytes) -> bytes:
    """What is kept of an unfinished event: all of it, or its head and tail."""
    return rest[:HEAD] + rest[-TAIL:] if len(rest) > HEAD + TAIL else rest


class SseTap(_Tap, Events):
    """Called with every chunk of one event stream, after the chunk has been forwarded.

    The usual chunk, one whole plain event, is counted by :class:`~relay.speedups.Events`
    (in C where built; the relay's sink then calls it with no Python frame); every other
    chunk comes to :meth:`_general`.
    """

    __slots__ = ("terminal",)
