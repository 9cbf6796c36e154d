"""``python -m bench.trace``: where a new request's time to first byte goes, step by step.

Runs W5's new requests (200 a second) against the relay started with ``--trace FILE``
(``bench/relay_server.py``), which wraps the functions that bound each step of the
per-request path and stamps ``time.perf_counter_ns()`` at each. Prints the median and
90th percentile of every step over the requests whose stamps came in the expected order
(the rare request that overlaps another is left out), beside W5's figures as the client
measures them, and writes the table to ``bench/results/trace-w5.txt``.

The wrappers cost about a microsecond each when hot and more from cold caches, so the
steps read longer than they are: compare runs of this tool with each other, not with the
client's figures. From the request's send to its answer the upstream works, and the relay
prepares the stream meanwhile (its meters): the relay's own total leaves that whole span out,
since what the relay does within it delays no byte (unless it outlasts the upstream).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, _cpus
from bench.systems import pin, raise_nofile, start_relay, start_upstream
from bench.workloads import Target, w5_ttfb

# What the time up to each stamp went on; the first stamp is the request's first bytes.
STEPS = (
    "read and parse the request head, create its task",
    "the loop runs the task",
    "request id, origin, credential and path checks, admission",
    "the body, the allowlist, the upstream request's path and headers",
    "the stream's watchdog",
    "the upstream request's head, and its send",
    "the stream's meters, while the upstream works",
    "the upstream answers (the rest of its time)",
    "the response's headers and taps",
    "the response head and the forwarder, up to the first write",
)
SENT, ANSWERED = 6, 8  # the stamps between which the upstream works (and the relay may too)

_current: list[int] | None = None
_traces: list[list[int]] = []


def _stamp(index: int) -> None:
    """Stamp step ``index`` of the request in flight; out of order, drop that request."""
    global _current
    if _current is not None and len(_current) == index:
        _current.append(time.perf_counter_ns())
        if index == len(STEPS):
            _traces.append(_current)
            _current = None
    else:
        _current = None


def _before(function: Callable[..., Any], index: int) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamp(index)
        return function(*args, **kwargs)

    return wrapper


def _after(function: Callable[..., Any], index: int) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        _stamp(index)
        return result

    return wrapper


def _around_coroutine(
    function: Callable[..., Any], before: int | None, after: int | None
) -> Callable[..., Any]:
    @functools.wraps(function)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            _stamp(before)
        result = await function(*args, **kwargs)
        if after is not None:
            _stamp(after)
        return result

    return wrapper


def install(path: str) -> None:
    """Wrap the step boundaries of the relay in this process; write the stamps to
    ``path`` (JSON) when the process exits."""
    import atexit

    from relay import connection, front, gate, proxy, server, upstream

    data_received = front.Front.data_received

    def arrived(self: front.Front, data: bytes) -> None:
        global _current
        if self.request is None:
            _current = [time.perf_counter_ns()]
        data_received(self, data)

    # Stamp 0 is a request's first bytes; stamp i ends step i of STEPS.
    front.Front.data_received = arrived  # type: ignore[method-assign]
    front.Front.on_headers_complete = _after(front.Front.on_headers_complete, 1)  # type: ignore[method-assign]
    server.handle = _around_coroutine(server.handle, 2, None)  # type: ignore[attr-defined]
    gate.Gate.admit = _around_coroutine(gate.Gate.admit, None, 3)  # type: ignore[method-assign]
    proxy._stream = _around_coroutine(proxy._stream, 4, None)
    upstream.Upstreams.send = _around_coroutine(upstream.Upstreams.send, 5, None)  # type: ignore[method-assign]
    connection.Connection.send = _around_coroutine(connection.Connection.send, None, 6)  # type: ignore[method-assign]
    upstream.Sent.response = _around_coroutine(upstream.Sent.response, 7, None)  # type: ignore[method-assign]
    connection.Connection.on_headers_complete = _before(  # type: ignore[method-assign]
        connection.Connection.on_headers_complete, 8
    )
    # The response begins in the callback that parsed the upstream's head (relay.proxy's
    # _Opening), not after the handler wakes: no step waits for the loop from here on.
    front.Request.start = _before(front.Request.start, 9)  # type: ignore[method-assign]
    connection.Connection.attach = _before(connection.Connection.attach, 10)  # type: ignore[method-assign]
    atexit.register(lambda: Path(path).write_text(json.dumps(_traces)))


def table(traces: list[list[int]]) -> list[tuple[str, float, float]]:
    """(step, median us, p90 us) for every step, then the relay's own total."""

    def spread(values: list[float]) -> tuple[float, float]:
        values.sort()
        return values[len(values) // 2], values[int(len(values) * 0.9)]

    rows = []
    for index, step in enumerate(STEPS):
        rows.append((step, *spread([(t[index + 1] - t[index]) / 1000 for t in traces])))
    own = [(t[-1] - t[0] - (t[ANSWERED] - t[SENT])) / 1000 for t in traces]
    rows.append(("the relay's own, first bytes in to first byte out", *spread(own)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="new requests per second")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    raise_nofile()
    rig, sut = _cpus()
    pin(rig)
    args.out.mkdir(parents=True, exist_ok=True)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="relay-trace-") as tmp:
        stamps = Path(tmp) / "trace.json"
        upstream, upstream_port = start_upstream(Path(tmp), rig)
        trace = ("--trace", str(stamps))
        relay = start_relay("relay", upstream_port, Path(tmp), sut, metrics=True, extra_args=trace)
        try:
            direct = Target(upstream_port, None, upstream_port, upstream.pid)
            relayed = Target(relay.port, relay, upstream_port, upstream.pid)
            seen = {
                name: uvloop.run(w5_ttfb(target, rate=args.rate, count=args.requests))
                for name, target in (("direct", direct), ("relay", relayed))
            }
        finally:
            relay.stop()
            upstream.terminate()
            upstream.wait(10)
        traces = json.loads(stamps.read_text())
    lines = [
        f"W5, {args.requests} new requests at {args.rate:g}/s; time to first byte as the"
        " client sees it:"
        f" direct p50 {seen['direct']['p50_us']} us, relay p50 {seen['relay']['p50_us']} us.",
        f"Steps of the {len(traces)} requests traced in order (us):",
        "",
        f"| {'step':<64} | median |   p90 |",
        f"|{'-' * 66}|--------|-------|",
    ]
    lines += [f"| {step:<64} | {p50:6.1f} | {p90:5.1f} |" for step, p50, p90 in table(traces)]
    text = "\n".join(lines) + "\n"
    name = "trace-w5.txt" if args.rate == 200.0 else f"trace-w5-{args.rate:g}.txt"
    (args.out / name).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
