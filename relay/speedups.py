"""Two byte scans of the per-chunk path, compiled when the install could build them.

The relay's user-space CPU per relayed event is mostly the Python run for each upstream
chunk, and on an event stream two scans of the chunk were some 9k of its 21.5k
instructions: framing it for the client, and the SSE tap's look at it. Each costs one C
call in ``relay._speedups`` (built from
``relay/_speedups.c`` by ``pip install``, given a C compiler) and a chain of bytes methods
here. The two implementations give the same results for every input
(``tests/test_speedups.py``); ``COMPILED`` says which one runs, and the start-up log says
it too.
"""

from __future__ import annotations

# The byte strings every terminal event carries (relay/sse.py); _speedups.c has them too.
MARKERS = (b"[DONE]", b'"complete"', b'"error"', b"base_resp")


def marked(events: bytes) -> bytes:
    """Whether ``events`` may hold a terminal event (non-empty when so)."""
    # On CPython 3.11 ``bytes.partition`` is the cheapest search there is (about 40 ns;
    # ``find`` parses its arguments the slow way and costs twice that, ``in`` more still).
    return (
        events.partition(MARKERS[0])[1]
        or events.partition(MARKERS[1])[1]
        or events.partition(MARKERS[2])[1]
        or events.partition(MARKERS[3])[1]
    )


def plain_event_py(chunk: bytes) -> int:
    """How a chunk that starts at an event boundary settles, if it is the usual one.

    1 if ``chunk`` is exactly one event that dispatches (it has a ``data`` field), 0 if it
    is exactly one block that dispatches nothing (a comment, say), each ending with the
    chunk's only blank line and holding no CR and no terminal marker; otherwise -1, and
    the SSE tap looks at it the general way.
    """
    event, boundary, rest = chunk.partition(b"\n\n")
    if boundary and not rest and not event.partition(b"\r")[1] and not marked(event):
        return 1 if event[:4] == b"data" or event.partition(b"\ndata")[1] else 0
    return -1


def frame_py(chunk: bytes) -> bytes:
    """``chunk`` in HTTP/1.1 chunked framing: its size in hex, CRLF, the chunk, CRLF."""
    return b"%x\r\n%b\r\n" % (len(chunk), chunk)


try:
    from relay._speedups import frame as frame
    from relay._speedups import plain_event as plain_event
except ImportError:  # installed without a C compiler: the same, in Python
    COMPILED = False
    frame, plain_event = frame_py, plain_event_py
else:
    COMPILED = True
