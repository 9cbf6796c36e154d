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

NONE = "none"

# Cheap byte checks first; a regex runs only on events that pass them.
_TYPE = re.compile(rb'"type"\s*:\s*"(complete|error)"')
_MINIMAX_ERROR = re.compile(rb'"status_code"\s*:\s*-?[1-9]')
_MINIMAX_FINAL = re.compile(rb'"status"\s*:\s*2\b')
_DONE = re.compile(rb"(?:^|\n)data:[ ]?\[DONE\][ \t]*(?:\n|$)")

HEAD = TAIL = 32 * 1024  # what is kept of one event larger than HEAD + TAIL
BATCH_BYTES = 4096  # chunks held (by reference) before the tap looks at them...
BATCH_CHUNKS = 64  # ... or this many, whichever comes first


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


class SseTap:
    """Called with every chunk of one event stream, after the chunk has been forwarded.

    It looks at chunks in batches: a chunk is only kept (a reference, not a copy) until
    :data:`BATCH_BYTES` or :data:`BATCH_CHUNKS` are held, or until someone reads
    :attr:`events`, :attr:`terminal` or :attr:`at_boundary` (the metrics flush does each
    second, the heartbeat when it is due, the handler at the stream's end). Each look costs
    a few C calls whatever it covers, so a stream of small events pays for them once per
    batch instead of once per event.
    """

    __slots__ = ("_batch", "_events", "_held", "_pending", "_terminal")

    def __init__(self) -> None:
        self._batch: list[bytes] = []
        self._held = 0
        self._pending = b""
        self._events = 0
        self._terminal = NONE

    @property
    def events(self) -> int:
        """Events seen so far (data-carrying blocks; comments and bare fields are not)."""
        self._settle()
        return self._events

    @property
    def terminal(self) -> str:
        """The last terminal event seen: ``done``, ``complete``, ``error``, or ``none``."""
        self._settle()
        return self._terminal

    @property
    def at_boundary(self) -> bool:
        """Whether everything forwarded so far ends on an event boundary."""
        self._settle()
        return not self._pending

    def __call__(self, chunk: bytes) -> None:
        self._batch.append(chunk)
        self._held += len(chunk)
        if self._held >= BATCH_BYTES or len(self._batch) >= BATCH_CHUNKS:
            self._settle()

    def _settle(self) -> None:
        batch = self._batch
        if batch:
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            batch.clear()
            self._held = 0
            self._look(data)

    def _look(self, chunk: bytes) -> None:
        """Account for ``chunk``, the stream's next bytes (one chunk or a batch of them)."""
        # The usual batch is whole plain events: settle it with a few C calls. On CPython
        # 3.11 ``bytes.partition`` is the cheapest search there is (about 40 ns; ``find``
        # parses its arguments the slow way and costs twice that, ``in`` more still).
        if not self._pending:
            event, boundary, rest = chunk.partition(b"\n\n")
            if not boundary or chunk.partition(b"\r")[1] or _marked(chunk):
                pass  # inside an event, CR line ends, or maybe a terminal: the long way
            elif not rest:  # one event
                if event[:4] == b"data" or event.partition(b"\ndata")[1]:
                    self._events += 1
                return
            elif chunk[-2:] == b"\n\n" and chunk[:4] == b"data":
                # Several events, each counted if every separator is followed by "data"
                # (a block that starts so, or with a lone newline and then "data", as the
                # split below would see it): then the counts of the two agree.
                separators = chunk.count(b"\n\n")
                if separators == chunk.count(b"\n\ndata") + 1:
                    self._events += separators
                    return
        self._general(chunk)

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
        marked = _marked(whole)  # one look for the markers per chunk, not per event
        for event in whole.split(b"\n\n"):
            if not (event[:4] == b"data" or event.partition(b"\ndata")[1]):
                continue  # comments and field-only blocks dispatch no event
            self._events += 1
            if marked and (kind := classify(event)) is not None:
                self._terminal = kind


def _marked(events: bytes) -> bytes:
    """Whether ``events`` may hold a terminal event (non-empty when so): a cheap look for
    the byte strings every terminal carries, before :func:`classify` runs its patterns."""
    return (
        events.partition(b"[DONE]")[1]
        or events.partition(b'"complete"')[1]
        or events.partition(b'"error"')[1]
        or events.partition(b"base_resp")[1]
    )


def _bounded(rest: bytes) -> bytes:
    """What is kept of an unfinished event: all of it, or its head and tail."""
    return rest[:HEAD] + rest[-TAIL:] if len(rest) > HEAD + TAIL else rest
