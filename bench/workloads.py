"""W0..W7: each drives one system (or the upstream directly) and returns plain numbers.

A workload gets a :class:`Target` (the port to talk to, and the system to read /proc from,
``None`` for direct) and its parameters, and returns a flat ``dict`` of metrics. Times are
microseconds, memory bytes, CPU seconds. Nothing here decides pass or fail.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from dataclasses import dataclass
from typing import TypedDict

from bench.client import EventSink, Stream, http_json, open_stream, request_bytes
from bench.systems import System, cpu_seconds, cpu_split
from bench.upstream import BLOCK_BYTES, bulk_block

Metrics = dict[str, float | int | str | None]


@dataclass
class Target:
    port: int
    system: System | None  # None: the client talks to the fake upstream directly
    upstream_port: int
    upstream_pid: int


def pct(values: list[int] | list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))])


def _us(ns: float) -> float:
    return round(ns / 1000, 1)


def expected_digest(size: int) -> int:
    """CRC-32 of the bulk body the fake upstream sends for ``size`` bytes.

    CRC-32 rather than SHA-256: the rig hashes every byte on its one core, and SHA-256
    halved its ceiling (about 0.9 GB/s against 1.6 GB/s here), close enough to the systems'
    figures to distort them. Any lost, repeated, reordered or altered byte changes the CRC
    (and the length is checked too); nothing here is adversarial.
    """
    block = bulk_block()
    crc = 0
    full, rest = divmod(size, BLOCK_BYTES)
    for _ in range(full):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(block[:rest], crc)


class UpstreamStats(TypedDict):
    """The fake upstream's ``GET /_bench/stats``."""

    open_streams: int
    requests: int
    closed: dict[str, int]  # a stream's id -> when its connection closed (monotonic ns)


async def _upstream_stats(target: Target) -> UpstreamStats:
    stats: UpstreamStats = json.loads(await http_json(target.upstream_port, "GET", "/_bench/stats"))
    return stats


async def _settle(target: Target, open_before: int, within: float) -> int:
    """Wait until the upstream holds no more streams than before; returns what it holds."""
    deadline = time.monotonic() + within
    while True:
        held = (await _upstream_stats(target))["open_streams"]
        if held <= open_before or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.1)


# --- W1: per-event latency of one stream ---------------------------------------------------


async def w1_latency(target: Target, *, events: int, rate: float) -> Metrics:
    sink = EventSink()
    query = f"mode=sse&n={events}&rate={rate}&pad=40"
    stream = await open_stream(target.port, request_bytes(target.port, query), events=sink)
    await asyncio.wait_for(stream.done, events / rate * 3 + 10)
    delays = sink.delays[5:]  # the first few carry connection setup
    return {
        "events": sink.count,
        "p50_us": _us(pct(delays, 0.5)),
        "p99_us": _us(pct(delays, 0.99)),
    }


# --- W2 (and W0): fan-out ------------------------------------------------------------------


async def w2_fanout(target: Target, *, streams: int, rate: float, seconds: float) -> Metrics:
    """``streams`` streams at ``rate`` events/s each; CPU and delivery over the steady
    window (all streams flowing, none finished yet)."""
    loop = asyncio.get_running_loop()
    sink = EventSink()
    n = max(2, round(rate * seconds))
    request = request_bytes(target.port, f"mode=sse&n={n}&rate={rate}&pad=40")
    flowing = 0
    window: dict[str, float] = {}
    all_flowing: asyncio.Future[None] = loop.create_future()
    sut_pids = target.system.pids if target.system is not None else []
    rig_pids = [target.upstream_pid]

    def sample(tag: str) -> None:
        window[f"{tag}_t"] = time.monotonic()
        window[f"{tag}_events"] = sink.count
        window[f"{tag}_sut_user"], system = cpu_split(sut_pids)
        window[f"{tag}_sut_cpu"] = window[f"{tag}_sut_user"] + system
        window[f"{tag}_rig_cpu"] = cpu_seconds(rig_pids) + time.process_time()

    def first_event(_: Stream) -> None:
        nonlocal flowing
        flowing += 1
        if flowing == streams and not all_flowing.done():
            sample("start")
            all_flowing.set_result(None)

    sample("open")
    opened: list[Stream] = []
    spacing = 1.0 / rate / streams  # spread the streams' phases over one event period
    t0 = loop.time()
    failures = 0
    for i in range(streams):
        delay = t0 + i * spacing - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            opened.append(
                await open_stream(target.port, request, events=sink, on_first_event=first_event)
            )
        except OSError:
            failures += 1
    timeout = seconds * 4 + 30
    try:
        await asyncio.wait_for(all_flowing, timeout)
        await asyncio.wait(
            [s.done for s in opened], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        sample("end")
        await asyncio.wait([s.done for s in opened], timeout=timeout)
        sample("close")
    except TimeoutError:
        pass
    finally:
        for s in opened:
            s.close()
    if "end_t" not in window:
        return {"error": f"only {flowing}/{streams} streams flowed", "failures": failures}
    first, last = "start", "end"
    if window["end_t"] - window["start_t"] < 1.0 and "close_t" in window:
        # Saturated: the streams fell so far behind that no steady window exists. Count
        # the whole workload instead (connection set-up included).
        first, last = "open", "close"
    wall = window[f"{last}_t"] - window[f"{first}_t"]
    events = window[f"{last}_events"] - window[f"{first}_events"]
    sut_cpu = window[f"{last}_sut_cpu"] - window[f"{first}_sut_cpu"]
    sut_user = window[f"{last}_sut_user"] - window[f"{first}_sut_user"]
    rig_cpu = window[f"{last}_rig_cpu"] - window[f"{first}_rig_cpu"]
    delays = sink.delays
    return {
        "streams": streams,
        "failures": failures,
        "incomplete": sum(1 for s in opened if not s.complete),
        "events": sink.count,
        "window_s": round(wall, 3),
        "window": "steady" if first == "start" else "whole (saturated)",
        "delivered_per_s": round(events / wall, 1) if wall > 0 else None,
        "expected_per_s": streams * rate,
        "p50_us": _us(pct(delays, 0.5)),
        "p99_us": _us(pct(delays, 0.99)),
        "cpu_s_per_1k_events": (
            round(sut_cpu / events * 1000, 5) if events and target.system else None
        ),
        "user_cpu_s_per_1k_events": (
            round(sut_user / events * 1000, 5) if events and target.system else None
        ),
        "sut_cpu_util": round(sut_cpu / wall, 3) if wall > 0 else None,
        "rig_cpu_util": round(rig_cpu / wall, 3) if wall > 0 else None,
    }


# --- W3: bulk, and a slow reader ----------------------------------------------------------


async def w3_bulk(target: Target, *, size: int, digest: int) -> Metrics:
    """One ``size``-byte body as fast as it flows, checked against the expected CRC-32."""
    crc = 0

    def check(view: memoryview) -> None:
        nonlocal crc
        crc = zlib.crc32(view, crc)

    request = request_bytes(target.port, f"mode=bulk&bytes={size}")
    cpu0 = target.system.cpu() if target.system else 0.0
    t0 = time.perf_counter()
    stream = await open_stream(target.port, request, on_body=check)
    await asyncio.wait_for(stream.done, 600)
    elapsed = time.perf_counter() - t0
    cpu = (target.system.cpu() - cpu0) if target.system else 0.0
    return {
        "bytes": stream.body_bytes,
        "identical": int(stream.body_bytes == size and crc == digest),
        "mb_per_s": round(size / elapsed / 1e6, 1),
        "cpu_s_per_gb": round(cpu / size * 1e9, 3) if target.system else None,
    }


async def w3_slow_reader(target: Target, *, size: int, stall: float) -> Metrics:
    """The client reads the first bytes, then stops reading for ``stall`` seconds."""
    assert target.system is not None
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    holder: list[Stream] = []

    def on_body(_: memoryview) -> None:
        if not started.done():
            assert holder[0].transport is not None
            holder[0].transport.pause_reading()
            started.set_result(None)

    rss0 = target.system.rss()
    request = request_bytes(target.port, f"mode=bulk&bytes={size}")
    open_before = (await _upstream_stats(target))["open_streams"]
    stream = await open_stream(target.port, request, on_body=on_body)
    holder.append(stream)
    await asyncio.wait_for(started, 30)
    peak = rss0
    deadline = loop.time() + stall
    while loop.time() < deadline:
        await asyncio.sleep(0.1)
        peak = max(peak, target.system.rss())
    received = stream.body_bytes
    stream.abort()
    await _settle(target, open_before, 10)
    return {"rss_growth_bytes": peak - rss0, "client_received_bytes": received}


# --- W4: idle streams ----------------------------------------------------------------------


async def w4_idle(
    target: Target, *, streams: int, budget: float, concurrency: int = 200
) -> Metrics:
    """Open ``streams`` idle streams within ``budget`` seconds; RSS per stream held."""
    assert target.system is not None
    request = request_bytes(target.port, "mode=sse&n=1&hold=1&pad=40")
    open_before = (await _upstream_stats(target))["open_streams"]
    rss0, fds0 = target.system.rss(), target.system.fds()
    gate = asyncio.Semaphore(concurrency)
    held: list[Stream] = []
    errors: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                stream, first = await _open_flowing(target.port, request)
            except OSError as exc:
                errors.append(type(exc).__name__)
                return
            held.append(stream)
            done = await asyncio.wait(
                [first, stream.done], timeout=30, return_when="FIRST_COMPLETED"
            )
            if first not in done[0]:
                errors.append(f"status {stream.status}" if stream.status else "no first event")

    tasks = [asyncio.ensure_future(one()) for _ in range(streams)]
    _, late = await asyncio.wait(tasks, timeout=budget)  # a system too slow to open them all
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    await asyncio.sleep(1.0)
    alive = sum(1 for s in held if not s.done.done() and s.n_events)
    rss1, fds1 = target.system.rss(), target.system.fds()
    for s in held:
        s.close()
    await _settle(target, open_before, 15)
    return {
        "asked": streams,
        "held": alive,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rss_per_stream_bytes": round((rss1 - rss0) / alive) if alive else None,
        "fds_per_stream": round((fds1 - fds0) / alive, 2) if alive else None,
    }


# --- W5: time to first byte at a fixed arrival rate ----------------------------------------


async def w5_ttfb(target: Target, *, rate: float, count: int) -> Metrics:
    """``count`` new requests at ``rate`` a second, each on a new connection: the time from
    connecting to the first body byte.

    A system's requests are paired with as many sent straight to the upstream, each half a
    period after its system request, and the *added* figures subtract those: both sides of
    the difference then see the same state of the machine. (Measured in separate runs, the
    direct figure alone moved by 100 us and more from one run to the next here.) The direct
    requests never touch the system's CPU, so the system still sees one request every
    ``1 / rate`` seconds. The system's CPU per request is all of its CPU over the workload,
    so each request's end and log record count too."""
    loop = asyncio.get_running_loop()
    paired = target.system is not None
    ttfbs: list[int] = []
    direct_ttfbs: list[int] = []
    errors = {target.port: 0, target.upstream_port: 0}
    requests = {
        port: request_bytes(port, "mode=sse&n=1&pad=40")
        for port in (target.port, target.upstream_port)
    }

    async def one(port: int, at: float, into: list[int]) -> None:
        await asyncio.sleep(max(0.0, at - loop.time()))
        t0 = time.monotonic_ns()
        try:
            stream = await open_stream(port, requests[port])
            await asyncio.wait_for(stream.done, 30)
        except (OSError, TimeoutError):
            errors[port] += 1
            return
        if stream.status == 200 and stream.first_body_ns:
            into.append(stream.first_body_ns - t0)
        else:
            errors[port] += 1

    start = loop.time() + 0.05
    cpu0 = target.system.cpu() if target.system else 0.0
    tasks = [one(target.port, start + i / rate, ttfbs) for i in range(count)]
    if paired:
        tasks += [
            one(target.upstream_port, start + (i + 0.5) / rate, direct_ttfbs) for i in range(count)
        ]
    await asyncio.gather(*tasks)
    cpu = (target.system.cpu() - cpu0) if target.system else 0.0
    p50, p99 = _us(pct(ttfbs, 0.5)), _us(pct(ttfbs, 0.99))
    result: Metrics = {
        "requests": count,
        "errors": errors[target.port],
        "p50_us": p50,
        "p99_us": p99,
    }
    if target.system:  # the whole request's, its end and its log record included
        result["cpu_ms_per_request"] = round(cpu * 1000 / count, 3)
    if paired:
        direct_p50, direct_p99 = _us(pct(direct_ttfbs, 0.5)), _us(pct(direct_ttfbs, 0.99))
        result |= {
            "paired_direct_errors": errors[target.upstream_port],
            "paired_direct_p50_us": direct_p50,
            "paired_direct_p99_us": direct_p99,
            "added_p50_us": round(p50 - direct_p50, 1),
            "added_p99_us": round(p99 - direct_p99, 1),
        }
    return result


# --- W7: churn -----------------------------------------------------------------------------


async def _abort_many(
    target: Target, count: int, concurrency: int, tag: str, aborted: dict[str, int]
) -> int:
    gate = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        key = f"{tag}-{i}"
        request = request_bytes(target.port, f"mode=sse&n=0&rate=50&pad=40&id={key}")
        async with gate:
            try:
                stream, first = await _open_flowing(target.port, request)
                await asyncio.wait_for(first, 30)
            except (OSError, TimeoutError):
                failed += 1
                return
            aborted[key] = time.monotonic_ns()
            stream.abort()

    await asyncio.gather(*[asyncio.ensure_future(one(i)) for i in range(count)])
    return failed


async def _open_flowing(port: int, request: bytes) -> tuple[Stream, asyncio.Future[None]]:
    """Open a stream; the future resolves when its first event arrives."""
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def flowing(_: Stream) -> None:
        if not first.done():
            first.set_result(None)

    stream = await open_stream(port, request, events=EventSink(), on_first_event=flowing)
    return stream, first


async def w7_churn(target: Target, *, aborts: int, concurrency: int = 50) -> Metrics:
    assert target.system is not None
    system = target.system
    await http_json(target.upstream_port, "POST", "/_bench/reset")
    warm: dict[str, int] = {}
    await _abort_many(target, min(100, aborts), concurrency, "warm", warm)
    open_before = await _settle(target, 0, 10)
    await asyncio.sleep(0.5)
    rss0, fds0, tasks0 = system.rss(), system.fds(), system.tasks()
    aborted: dict[str, int] = {}
    failed = await _abort_many(target, aborts, concurrency, "churn", aborted)
    still_open = await _settle(target, open_before, 10)
    await asyncio.sleep(0.5)
    rss1, fds1, tasks1 = system.rss(), system.fds(), system.tasks()
    closed = (await _upstream_stats(target))["closed"]
    lags = [closed[k] - t for k, t in aborted.items() if k in closed]
    return {
        "aborts": len(aborted),
        "failed": failed,
        "upstream_left_open": still_open - open_before,
        "upstream_not_closed": sum(1 for k in aborted if k not in closed),
        "close_p50_us": _us(pct(lags, 0.5)),
        "close_p99_us": _us(pct(lags, 0.99)),
        "fd_growth": fds1 - fds0,
        "task_growth": None if tasks0 is None or tasks1 is None else tasks1 - tasks0,
        "rss_growth_bytes": rss1 - rss0,
    }
