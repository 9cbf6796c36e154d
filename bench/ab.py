"""``python -m bench.ab BASE [NEW]``: the relay at two commits, measured side by side.

On a shared machine absolute figures drift by 10 to 20% between runs, more than most
single changes are worth; a before-and-after comparison is only trustworthy when both are
measured in the same run, interleaved. This exports each commit with ``git archive`` into
a temporary directory, and in every round starts the relay from each copy (and nginx,
when installed, as the yardstick), in shuffled order, pinned as ``python -m bench`` pins
them. It runs one workload per round and prints each round and the medians:

- ``w2``: CPU ms per 1,000 events under W2's fan-out (500 streams x 20 events/s);
- ``w2-p99``: W2's p99 event delay in us (the fan-out's tail);
- ``w4``: W4's RSS per idle open stream (8,000 streams);
- ``w5``: W5's time to first byte, p50 added over the direct upstream (W5 pairs each of
  the system's requests with one sent straight to the upstream).

Both commits must have ``bench/relay_server.py``. NEW defaults to HEAD. ``--new-env
NAME=VALUE`` sets a variable for NEW's relay only: given the same commit twice, it measures
a setting (``python -m bench.ab HEAD HEAD --new-env PYTHONMALLOC=malloc``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import uvloop

from bench.harness import PROFILES, _cpus
from bench.systems import (
    HERE,
    System,
    nginx_binary,
    pin,
    raise_nofile,
    start_nginx,
    start_relay,
    start_upstream,
)
from bench.workloads import Metrics, Target, w2_fanout, w4_idle, w5_ttfb

NGINX = "nginx"


def export(commit: str, into: Path) -> Path:
    """A copy of ``commit``'s tree (no working-tree changes) under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", commit],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


UNITS = {
    "w2": "CPU ms per 1,000 events",
    "w2-p99": "us W2 event delay p99 (the fan-out's tail)",
    "w4": "KiB RSS per idle open stream",
    "w5": "us added TTFB p50",
}
Starter = Callable[[int], System]  # the upstream's port -> a started system


async def measure(workload: str, target: Target) -> float:
    """One figure of one system, with ``python -m bench``'s full parameters: W2's CPU per
    1,000 events, W4's RSS per idle stream, or W5's p50 added over the direct upstream
    (from requests paired with the system's)."""
    params = PROFILES["full"]
    if workload in ("w2", "w2-p99"):
        result = await w2_fanout(target, **params["w2"])
        if "error" in result:
            raise RuntimeError(f"W2 failed: {result['error']}")
        if result["window"] != "steady":  # it fell behind: its CPU per event includes queueing
            print(f"  {target.system.name if target.system else '?'} saturated in this round")
        return (
            1000 * _figure(result, "cpu_s_per_1k_events")
            if workload == "w2"
            else _figure(result, "p99_us")
        )
    if workload == "w4":
        result = await w4_idle(target, **params["w4"])
        return _figure(result, "rss_per_stream_bytes") / 1024
    await w5_ttfb(target, rate=params["w5"]["rate"], count=100)  # warm the upstream pool
    result = await w5_ttfb(target, **params["w5"])  # paired with direct requests
    return _figure(result, "added_p50_us")


def _figure(result: Metrics, key: str) -> float:
    value = result.get(key)
    if not isinstance(value, int | float):
        raise RuntimeError(f"no {key} in {result}")
    return float(value)


async def compare(
    starters: dict[str, Starter], workload: str, rounds: int, workdir: Path, rig: int | None
) -> dict[str, float]:
    """Run ``workload`` on every system, in shuffled order, ``rounds`` times; print each
    round and return the medians."""
    upstream, upstream_port = start_upstream(workdir, rig)
    results: dict[str, list[float]] = {name: [] for name in starters}
    print(f"{workload}: {UNITS[workload]}; {rounds} round(s)", flush=True)
    try:
        for round_no in range(rounds):
            order = list(starters)
            random.shuffle(order)
            for name in order:
                system = starters[name](upstream_port)
                try:
                    target = Target(system.port, system, upstream_port, upstream.pid)
                    results[name].append(await measure(workload, target))
                finally:
                    system.stop()
            line = "  ".join(f"{name} {values[-1]:8.1f}" for name, values in results.items())
            print(f"round {round_no + 1}: {line}", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(10)
    medians = {name: statistics.median(values) for name, values in results.items()}
    print("median:  " + "  ".join(f"{name} {value:8.1f}" for name, value in medians.items()))
    return medians


async def run(args: argparse.Namespace, trees: dict[str, Path], workdir: Path) -> None:
    rig, sut = _cpus()
    pin(rig)

    envs = {"base": {}, "new": dict(item.split("=", 1) for item in args.new_env)}

    def relay_from(name: str, tree: Path) -> Starter:
        return lambda port: start_relay(
            name, port, workdir, sut, metrics=True, tree=tree, extra_env=envs[name]
        )

    starters = {name: relay_from(name, tree) for name, tree in trees.items()}
    if nginx_binary() is not None:
        starters[NGINX] = lambda port: start_nginx(port, workdir, sut)
    print(f"base {args.base}, new {args.new}" + "".join(f" {item}" for item in args.new_env))
    medians = await compare(starters, args.workload, args.rounds, workdir, rig)
    base, new = medians["base"], medians["new"]
    print(f"new / base: {new / base:.3f}")
    if NGINX in medians and args.workload == "w2":
        print(f"vs nginx: base {base / medians[NGINX]:.2f}x, new {new / medians[NGINX]:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("base", help="the commit to compare against")
    parser.add_argument("new", nargs="?", default="HEAD", help="the commit to measure")
    parser.add_argument("--workload", choices=sorted(UNITS), default="w2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--new-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set for NEW's relay only (repeatable)",
    )
    args = parser.parse_args()
    if bad := [item for item in args.new_env if "=" not in item]:
        parser.error(f"--new-env takes NAME=VALUE, not {bad[0]!r}")
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="relay-ab-") as tmp:
        work = Path(tmp)
        trees = {"base": export(args.base, work / "base"), "new": export(args.new, work / "new")}
        uvloop.run(run(args, trees, work))  # the rig runs on uvloop, as in python -m bench
    return 0


if __name__ == "__main__":
    sys.exit(main())
