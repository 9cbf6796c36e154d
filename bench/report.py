"""The results as a markdown table, ratios against direct and nginx, and the issue's targets."""

from __future__ import annotations

import math
from typing import Any

Medians = dict[str, dict[str, dict[str, Any]]]
COLUMNS = ("direct", "relay", "relay-nometrics", "nginx", "naive")
KIB = 1024

# (workload, metric key, label, how to show it, added-over-direct?)
ROWS: tuple[tuple[str, str, str, str, bool], ...] = (
    ("W0", "delivered_per_s", "W0 rig calibration: events/s delivered (2x W2 rate)", "int", False),
    ("W0", "rig_cpu_util", "W0 rig CPU use (1.0 = the rig's whole core)", "f2", False),
    ("W0", "p99_us", "W0 direct p99 event delay (us)", "f0", False),
    ("W1", "p50_us", "W1 one stream: event delay p50 (us)", "f0", True),
    ("W1", "p99_us", "W1 one stream: event delay p99 (us)", "f0", True),
    ("W2", "p50_us", "W2 fan-out: event delay p50 (us)", "f0", True),
    ("W2", "p99_us", "W2 fan-out: event delay p99 (us)", "f0", True),
    ("W2", "cpu_s_per_1k_events", "W2 fan-out: CPU ms per 1,000 events", "ms", False),
    ("W2", "user_cpu_s_per_1k_events", "&nbsp;&nbsp;of which user space (ms)", "ms", False),
    ("W2", "delivered_per_s", "W2 fan-out: events/s delivered", "int", False),
    ("W3", "mb_per_s", "W3 bulk: MB/s", "f0", False),
    ("W3", "identical", "W3 bulk: byte-identical (length + CRC-32)", "yn", False),
    ("W3", "cpu_s_per_gb", "W3 bulk: CPU s per GB", "f2", False),
    ("W3slow", "rss_growth_bytes", "W3 slow reader: RSS growth while stalled (KiB)", "kib", False),
    ("W4", "held", "W4 idle: streams held", "int", False),
    ("W4", "rss_per_stream_bytes", "W4 idle: RSS per open stream (KiB)", "kib1", False),
    ("W4", "fds_per_stream", "W4 idle: file descriptors per stream", "f2", False),
    ("W5", "p50_us", "W5 new request TTFB p50 (us)", "f0", True),
    ("W5", "p99_us", "W5 new request TTFB p99 (us)", "f0", True),
    ("W5", "cpu_ms_per_request", "W5 CPU per new request (ms)", "f2", False),
    ("W5", "errors", "W5 errors", "int", False),
    ("W5load", "p50_us", "W5 at 1,000/s: new request TTFB p50 (us)", "f0", True),
    ("W5load", "p99_us", "W5 at 1,000/s: new request TTFB p99 (us)", "f0", True),
    ("W5load", "cpu_ms_per_request", "W5 at 1,000/s: CPU per new request (ms)", "f2", False),
    ("W5load", "errors", "W5 at 1,000/s: errors", "int", False),
    ("W7", "upstream_not_closed", "W7 churn: upstream streams not closed", "int", False),
    ("W7", "close_p50_us", "W7 churn: abort to upstream close p50 (us)", "f0", False),
    ("W7", "close_p99_us", "W7 churn: abort to upstream close p99 (us)", "f0", False),
    ("W7", "fd_growth", "W7 churn: fd growth", "int", False),
    ("W7", "task_growth", "W7 churn: asyncio task growth", "int", False),
    ("W7", "rss_growth_bytes", "W7 churn: RSS growth (KiB)", "kib", False),
)


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def _fmt(value: Any, kind: str) -> str:
    v = _num(value)
    if v is None:
        return "-" if value is None else str(value)
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "f0":
        return f"{v:,.0f}"
    if kind == "f2":
        return f"{v:.2f}"
    if kind == "ms":
        return f"{v * 1000:.1f}"
    if kind == "kib":
        return f"{v / KIB:,.0f}"
    if kind == "kib1":
        return f"{v / KIB:.1f}"
    if kind == "yn":
        return "yes" if v >= 1 else "NO"
    return str(value)


def _get(medians: Medians, workload: str, system: str, key: str) -> float | None:
    return _num(medians.get(workload, {}).get(system, {}).get(key))


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def targets(medians: Medians) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this run's medians (None: not measured)."""

    def g(workload: str, system: str, key: str) -> float | None:
        return _get(medians, workload, system, key)

    out: list[dict[str, Any]] = []

    def add(
        name: str, value: float | None, limit: str, ok: bool | None, why: str | None = None
    ) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": ok, "why": why})

    relay_cpu, nginx_cpu, naive_cpu = (
        g("W2", s, "cpu_s_per_1k_events") for s in ("relay", "nginx", "naive")
    )

    def cpu_ratio(name: str, a: str, b: str, value: float | None, limit: str, ok: bool) -> None:
        """A saturated system queues and its CPU per event grows: no verdict against it."""
        windows = {s: medians.get("W2", {}).get(s, {}).get("window", "steady") for s in (a, b)}
        saturated = [f"{s} {w}" for s, w in windows.items() if w != "steady"]
        if saturated:
            add(name, value, limit, None, "not comparable: " + "; ".join(saturated))
        else:
            add(name, value, limit, None if value is None else ok)

    r = relay_cpu / nginx_cpu if relay_cpu and nginx_cpu else None
    cpu_ratio("CPU per event vs nginx (W2)", "relay", "nginx", r, "<= 1.25x", (r or 0) <= 1.25)
    r = naive_cpu / relay_cpu if relay_cpu and naive_cpu else None
    cpu_ratio("naive CPU per event / relay's (W2)", "naive", "relay", r, ">= 4x", (r or 0) >= 4)
    d = _added(medians, "W5", "relay", "p50_us")
    add("added TTFB p50 over direct, us (W5)", d, "<= 300 us", None if d is None else d <= 300)
    relay_p99, nginx_p99 = g("W2", "relay", "p99_us"), g("W2", "nginx", "p99_us")
    d = relay_p99 - nginx_p99 if relay_p99 is not None and nginx_p99 is not None else None
    add("fan-out p99 minus nginx's, us (W2)", d, "<= 1000 us", None if d is None else d <= 1000)
    idle = g("W4", "relay", "rss_per_stream_bytes")
    kib = idle / KIB if idle is not None else None
    add("RSS per idle stream, KiB (W4)", kib, "<= 12 KiB", None if kib is None else kib <= 12)
    relay_mb, nginx_mb = g("W3", "relay", "mb_per_s"), g("W3", "nginx", "mb_per_s")
    r = relay_mb / nginx_mb if relay_mb and nginx_mb else None
    add("bulk throughput vs nginx (W3)", r, ">= 1.0x", None if r is None else r >= 1.0)
    return out


def _added(medians: Medians, workload: str, system: str, key: str) -> float | None:
    """What ``system`` adds to the direct upstream's ``key``: from the direct requests
    paired with its own where the workload sends them (W5's ``added_*``), else against the
    direct upstream's own run."""
    paired = _get(medians, workload, system, f"added_{key}")
    if paired is not None:
        return paired
    value, direct = _get(medians, workload, system, key), _get(medians, workload, "direct", key)
    return None if value is None or direct is None else value - direct


def _speedups_note(meta: dict[str, Any]) -> str:
    if meta.get("relay_speedups"):
        return "The relay ran its compiled per-chunk code (`relay._speedups`)."
    return "The relay ran without its compiled per-chunk code (`relay._speedups` not built)."


def markdown(medians: Medians, meta: dict[str, Any]) -> str:
    present = [c for c in COLUMNS if any(c in by for by in medians.values())]
    head = [
        "metric (median of rounds)",
        *present,
        "relay / direct",
        "relay / nginx",
        "relay / naive",
    ]
    lines = [
        f"Benchmark `{meta['profile']}`: `{meta['command']}`, {meta['date_utc']} UTC, "
        f"{meta['elapsed_s']:.0f} s; rig on CPU {meta['pinning']['rig_cpu']}, systems on CPU "
        f"{meta['pinning']['sut_cpu']}. Rows marked *added* subtract the direct figure. "
        + _speedups_note(meta),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for workload, key, label, kind, added in ROWS:
        if workload not in medians:
            continue
        values = {c: _get(medians, workload, c, key) for c in present}
        if all(v is None for v in values.values()):
            continue
        cells = [_fmt(values[c], kind) if c in medians[workload] else "" for c in present]
        ratios = [
            _ratio(values.get("relay"), values.get(other)) for other in ("direct", "nginx", "naive")
        ]
        lines.append("| " + " | ".join([label, *cells, *ratios]) + " |")
        if added and values.get("direct") is not None:
            extra = {
                c: None if c == "direct" else _added(medians, workload, c, key) for c in present
            }
            cells = [_fmt(extra[c], kind) if extra[c] is not None else "" for c in present]
            ratios = [
                "",
                _ratio(extra.get("relay"), extra.get("nginx")),
                _ratio(extra.get("relay"), extra.get("naive")),
            ]
            lines.append(
                "| " + " | ".join(["&nbsp;&nbsp;*added* over direct (us)", *cells, *ratios]) + " |"
            )
    lines += ["", "| target (issue 4) | this run | limit | met |", "|---|---|---|---|"]
    for t in targets(medians):
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        met = t.get("why") or {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {value} | {t['limit']} | {met} |")
    for note in meta.get("notes", []):
        lines.append(f"\nNote: {note}")
    errors = [
        f"{w}/{s}: {m['error']}"
        for w, by in medians.items()
        for s, m in by.items()
        if m.get("error")
    ]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"
