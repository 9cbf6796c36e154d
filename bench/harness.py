"""``python -m bench``: start the rig and the systems, run W0..W7 in shuffled rounds, report.

The rig (this process, the load client, and the fake upstream subprocess) is pinned to one
CPU and every system under test to the other. Each round starts fresh systems, shuffles the
workloads and, within each workload, the systems. Medians over rounds go to
``bench/results/{full,quick}.{md,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import report
from bench.systems import (
    HERE,
    NGINX_HINT,
    System,
    nginx_binary,
    pin,
    raise_nofile,
    speedups_built,
    start_naive,
    start_nginx,
    start_relay,
    start_upstream,
)
from bench.workloads import (
    Metrics,
    Target,
    expected_digest,
    w1_latency,
    w2_fanout,
    w3_bulk,
    w3_slow_reader,
    w4_idle,
    w5_ttfb,
    w7_churn,
)

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "rounds": 3,
        "w0": {"streams": 500, "rate": 40.0, "seconds": 5.0},
        "w1": {"events": 1000, "rate": 500.0},
        "w2": {"streams": 500, "rate": 20.0, "seconds": 6.0},
        "w3": {"size": 512 * MIB},
        "w3_slow": {"size": 256 * MIB, "stall": 3.0},
        "w4": {"streams": 8000, "budget": 30.0},
        "w5": {"rate": 200.0, "count": 1000},
        "w5_load": {"rate": 1000.0, "count": 2000},
        "w7": {"aborts": 1000},
    },
    "quick": {
        "rounds": 1,
        "w0": {"streams": 200, "rate": 40.0, "seconds": 2.0},
        "w1": {"events": 300, "rate": 500.0},
        "w2": {"streams": 200, "rate": 20.0, "seconds": 3.0},
        "w3": {"size": 64 * MIB},
        "w3_slow": {"size": 64 * MIB, "stall": 1.5},
        "w4": {"streams": 1000, "budget": 15.0},
        "w5": {"rate": 200.0, "count": 200},
        "w5_load": {"rate": 1000.0, "count": 400},
        "w7": {"aborts": 200},
    },
}

DIRECT = "direct"
RELAY = "relay"
RELAY_NOMETRICS = "relay-nometrics"
NGINX = "nginx"
NAIVE = "naive"
SYSTEMS = (DIRECT, RELAY, RELAY_NOMETRICS, NGINX, NAIVE)

# Which systems each workload runs against (W6 is W1 and W2 with the metrics-off relay).
PLAN: dict[str, tuple[str, ...]] = {
    "W0": (DIRECT,),
    "W1": SYSTEMS,
    "W2": SYSTEMS,
    "W3": (DIRECT, RELAY, NGINX, NAIVE),
    "W3slow": (RELAY, NGINX, NAIVE),
    "W4": (RELAY, NGINX, NAIVE),
    "W5": (DIRECT, RELAY, NGINX, NAIVE),
    # The naive relay takes about 2 ms of CPU per new request: 1,000 a second would saturate it.
    "W5load": (DIRECT, RELAY, NGINX),
    "W7": (RELAY, NGINX, NAIVE),
}


def _cpus() -> tuple[int | None, int | None]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


class Run:
    def __init__(self, profile: str, only: set[str] | None, workdir: Path) -> None:
        self.name = profile
        self.params = PROFILES[profile]
        self.only = only
        self.workdir = workdir
        self.rig_cpu, self.sut_cpu = _cpus()
        self.notes: list[str] = []
        self.samples: dict[str, dict[str, list[Metrics]]] = {}
        self.digest = expected_digest(self.params["w3"]["size"])

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def start_systems(self, upstream_port: int, round_no: int) -> dict[str, System]:
        wanted = {s for w, systems in PLAN.items() if self._runs(w) for s in systems}
        systems: dict[str, System] = {}
        starters: dict[str, Callable[[], System]] = {
            RELAY: lambda: start_relay(
                RELAY, upstream_port, self.workdir, self.sut_cpu, metrics=True
            ),
            RELAY_NOMETRICS: lambda: start_relay(
                RELAY_NOMETRICS, upstream_port, self.workdir, self.sut_cpu, metrics=False
            ),
            NGINX: lambda: start_nginx(upstream_port, self.workdir, self.sut_cpu),
            NAIVE: lambda: start_naive(upstream_port, self.workdir, self.sut_cpu),
        }
        for name, start in starters.items():
            if name not in wanted:
                continue
            if name == NGINX and nginx_binary() is None:
                if round_no == 0:
                    msg = f"nginx is not installed; skipping it. Install it with: {NGINX_HINT}"
                    self.log(msg)
                    self.notes.append(msg)
                continue
            try:
                systems[name] = start()
            except Exception as exc:
                msg = f"{name} did not start: {exc}"
                self.log(msg)
                self.notes.append(msg)
        return systems

    def _runs(self, workload: str) -> bool:
        return self.only is None or workload in self.only

    async def one(self, workload: str, target: Target) -> Metrics:
        p = self.params
        calls: dict[str, Callable[[], Awaitable[Metrics]]] = {
            "W0": lambda: w2_fanout(target, **p["w0"]),
            "W1": lambda: w1_latency(target, **p["w1"]),
            "W2": lambda: w2_fanout(target, **p["w2"]),
            "W3": lambda: w3_bulk(target, digest=self.digest, **p["w3"]),
            "W3slow": lambda: w3_slow_reader(target, **p["w3_slow"]),
            "W4": lambda: w4_idle(target, **p["w4"]),
            "W5": lambda: w5_ttfb(target, **p["w5"]),
            "W5load": lambda: w5_ttfb(target, **p["w5_load"]),
            "W7": lambda: w7_churn(target, **p["w7"]),
        }
        return await calls[workload]()

    async def main(self) -> None:
        upstream, upstream_port = start_upstream(self.workdir, self.rig_cpu)
        try:
            for round_no in range(self.params["rounds"]):
                await self.round(round_no, upstream.pid, upstream_port)
        finally:
            upstream.terminate()
            upstream.wait(10)

    async def round(self, round_no: int, upstream_pid: int, upstream_port: int) -> None:
        self.log(f"round {round_no + 1}/{self.params['rounds']}: starting systems")
        systems = self.start_systems(upstream_port, round_no)
        try:
            workloads = [w for w in PLAN if self._runs(w)]
            random.shuffle(workloads)
            for workload in workloads:
                order = [s for s in PLAN[workload] if s == DIRECT or s in systems]
                random.shuffle(order)
                for name in order:
                    system = systems.get(name)
                    port = upstream_port if system is None else system.port
                    target = Target(port, system, upstream_port, upstream_pid)
                    t0 = time.monotonic()
                    try:
                        metrics = await self.one(workload, target)
                    except Exception as exc:
                        traceback.print_exc()
                        metrics = {"error": f"{type(exc).__name__}: {exc}"}
                    self.samples.setdefault(workload, {}).setdefault(name, []).append(metrics)
                    self.log(f"{workload:<6} {name:<16} {time.monotonic() - t0:5.1f}s {metrics}")
                    await asyncio.sleep(0.3)  # let the last connections close
        finally:
            for system in systems.values():
                system.stop()

    def medians(self) -> dict[str, dict[str, Metrics]]:
        out: dict[str, dict[str, Metrics]] = {}
        for workload, by_system in self.samples.items():
            for name, runs in by_system.items():
                merged: Metrics = {}
                keys = {k for r in runs for k in r}
                for key in sorted(keys):
                    values = [r[key] for r in runs if key in r]
                    numbers = [v for v in values if isinstance(v, int | float)]
                    if key == "identical":  # byte identity must hold in every round
                        merged[key] = min(numbers) if numbers else None
                    elif key == "window":  # steady only if every round was
                        saturated = sum(v != "steady" for v in values)
                        merged[key] = (
                            f"saturated in {saturated} of {len(values)} rounds"
                            if saturated
                            else "steady"
                        )
                    elif numbers and len(numbers) == len(values):
                        merged[key] = statistics.median(numbers)
                    else:
                        merged[key] = next((v for v in values if v is not None), None)
                out.setdefault(workload, {})[name] = merged
        return out


def _meta(run: Run, argv: list[str], elapsed: float) -> dict[str, Any]:
    return {
        "command": "python -m bench " + " ".join(argv),
        "profile": run.name,
        "params": run.params,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "elapsed_s": round(elapsed, 1),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "pinning": {"rig_cpu": run.rig_cpu, "sut_cpu": run.sut_cpu},
        "nginx": nginx_binary(),
        "relay_speedups": speedups_built(HERE.parent),
        "notes": run.notes,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="everything small (< 2 minutes)")
    parser.add_argument("--rounds", type=int, help="override the profile's number of rounds")
    parser.add_argument(
        "--only", help="comma-separated workloads to run (W0,W1,W2,W3,W3slow,W4,W5,W5load,W7)"
    )
    parser.add_argument("--seed", type=int, help="seed for the shuffled order")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results are written")
    args = parser.parse_args(argv)

    profile = "quick" if args.quick else "full"
    only = {w.strip() for w in args.only.split(",")} if args.only else None
    if args.seed is not None:
        random.seed(args.seed)
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        run = Run(profile, only, Path(tmp))
        if args.rounds:
            run.params = {**run.params, "rounds": args.rounds}
        if run.rig_cpu is None:
            run.notes.append("fewer than 2 CPUs: rig and systems are not pinned apart")
        pin(run.rig_cpu)
        run.log(
            f"profile {profile}, {run.params['rounds']} round(s); rig on CPU {run.rig_cpu}, "
            f"systems on CPU {run.sut_cpu}"
        )
        t0 = time.monotonic()
        import uvloop

        uvloop.run(run.main())
        elapsed = time.monotonic() - t0
        medians = run.medians()
        meta = _meta(run, argv, elapsed)
    name = profile if only is None else f"{profile}-partial"
    args.out.mkdir(parents=True, exist_ok=True)
    table = report.markdown(medians, meta)
    (args.out / f"{name}.md").write_text(table)
    (args.out / f"{name}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "medians": medians,
                "targets": report.targets(medians),
                "rounds": run.samples,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    print()
    print(table)
    print(f"written: {args.out / (name + '.md')} and .json ({elapsed:.0f}s)")
    return 0
