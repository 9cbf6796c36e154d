"""``python -m bench.profile``: py-spy on the relay under the W2 fan-out (the per-chunk path)
or, with ``--workload w5``, under W5's new requests (the per-request path).

Starts the fake upstream and the relay (full metrics) pinned as in ``python -m bench``,
samples the relay with ``py-spy record`` while the workload runs, and writes the collapsed
stacks and a summary (self and inclusive share per function) to
``bench/results/profile-{w2,w5}.*``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import RESULTS, _cpus
from bench.systems import pin, raise_nofile, start_relay, start_upstream
from bench.workloads import Target, w2_fanout, w5_ttfb


def summarise(collapsed: Path, top: int = 40) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";")]  # drop line numbers
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return "no samples\n"
    out = [f"{total} samples\n", "self %  function", "------  --------"]
    out += [f"{100 * n / total:6.1f}  {f}" for f, n in own.most_common(top)]
    out += ["", "incl %  function", "------  --------"]
    out += [f"{100 * n / total:6.1f}  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out) + "\n"


async def _load(target: Target, workload: str, streams: int, seconds: float) -> None:
    if workload == "w5":
        result = await w5_ttfb(target, rate=200.0, count=int(seconds * 200))
    else:
        result = await w2_fanout(target, streams=streams, rate=20.0, seconds=seconds)
    print(result, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--workload", choices=("w2", "w5"), default="w2")
    parser.add_argument("--streams", type=int, default=500, help="W2's streams")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--gc-tuned", action="store_true", help="run the relay with gc.freeze() (an experiment)"
    )
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    raise_nofile()
    rig, sut = _cpus()
    pin(rig)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-{args.workload}" + ("-gc-tuned" if args.gc_tuned else "")
    collapsed = args.out / f"{stem}.collapsed.txt"
    with tempfile.TemporaryDirectory(prefix="relay-profile-") as tmp:
        upstream, upstream_port = start_upstream(Path(tmp), rig)
        relay = start_relay(
            "relay",
            upstream_port,
            Path(tmp),
            sut,
            metrics=True,
            extra_args=("--gc-tuned",) if args.gc_tuned else (),
        )
        try:
            assert relay.proc is not None
            spy = subprocess.Popen(
                [
                    *(py_spy, "record", "--pid", str(relay.proc.pid), "--rate", str(args.rate)),
                    *("--duration", str(int(args.seconds) + 3), "--format", "raw"),
                    *("--output", str(collapsed), "--nonblocking"),
                ],
            )
            target = Target(relay.port, relay, upstream_port, upstream.pid)
            import uvloop

            uvloop.run(_load(target, args.workload, args.streams, args.seconds))
            spy.wait(60)
        finally:
            relay.stop()
            upstream.terminate()
            upstream.wait(10)
    summary = summarise(collapsed)
    (args.out / f"{stem}.txt").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
