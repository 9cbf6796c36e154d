"""The record of one request as it crosses the relay: what the log line and metrics report.

Filled in by the handler as it goes; read once when the request ends, whatever way it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

# Stream outcomes (the ``outcome`` label). ``shutdown`` marks streams still open when the
# drain grace after SIGTERM ran out; ``rejected`` marks requests answered by the relay itself.
COMPLETED = "completed"
CLIENT_CLOSED = "client_closed"
UPSTREAM_ERROR = "upstream_error"
TTFB_TIMEOUT = "ttfb_timeout"
IDLE_TIMEOUT = "idle_timeout"
MAX_DURATION = "max_duration"
SHUTDOWN = "shutdown"
DRAINED = "drained"  # the client left on a drain route; the upstream was read to its end
REJECTED = "rejected"

NO_MODEL = "-"


@dataclass(slots=True)
class Exchange:
    """Per-request facts. Times are ``time.monotonic()`` seconds."""

    request_id: str
    client: str
    started: float
    route: str = "-"
    model: str = NO_MODEL  # an allowlisted id or family/* pattern, or "-": a bounded label
    requested_model: str | None = None  # what the client asked for (logs only)
    status: int = 0
    outcome: str = REJECTED
    error: str | None = None  # data.error of the envelope the relay answered with
    detail: str | None = None  # the exception class that cut a stream (logs only)
    bytes_in: int = 0
    bytes_out: int = 0
    chunks: int = 0
    first_byte_at: float | None = None
    drained_bytes: int | None = None  # drain routes: bytes read after the client left
    heartbeats: int = 0  # SSE keep-alive comments written by the relay
    sse_events: int | None = None  # event streams only
    terminal: str | None = None  # event streams only: done, complete, error or none
    upstream_contacted: bool = False  # stream metrics apply from here on
