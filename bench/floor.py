"""``python -m bench.floor``: the relay, nginx, and the floor a server side of our own
could reach (``bench/peers/floor.py``: the relay's upstream client behind a bare protocol,
none of the relay's features), on W2's CPU per event, W4's memory per idle stream and
W5's time to first byte, in shuffled rounds as ``python -m bench.ab`` runs them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import uvloop

from bench.ab import UNITS, Starter, compare
from bench.harness import _cpus
from bench.systems import nginx_binary, pin, raise_nofile, start_floor, start_nginx, start_relay


async def run(workloads: list[str], rounds: int, workdir: Path) -> None:
    rig, sut = _cpus()
    pin(rig)
    starters: dict[str, Starter] = {
        "relay": lambda port: start_relay("relay", port, workdir, sut, metrics=True),
        "floor": lambda port: start_floor(port, workdir, sut),
    }
    if nginx_binary() is not None:
        starters["nginx"] = lambda port: start_nginx(port, workdir, sut)
    for workload in workloads:
        await compare(starters, workload, rounds, workdir, rig)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--workloads", default="w2,w4,w5", help=f"of {', '.join(UNITS)}")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="relay-floor-") as tmp:
        uvloop.run(run(args.workloads.split(","), args.rounds, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
