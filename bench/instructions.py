"""``python -m bench.instructions``: what one new request and one relayed event cost the
relay in CPU instructions, counted by valgrind's callgrind rather than timed.

Timings on this shared machine drift by 10 to 20% between runs, which hides any change to
the per-request path smaller than that (W5). An instruction count does not drift: the same
code on the same inputs executes the same instructions whatever else the machine does. So
this runs the relay under ``valgrind --tool=callgrind`` in front of the fake upstream and,
after a warm-up, counts:

- **per request**: W5's request (a new connection, one SSE event) sent one at a time;
- **per event**: the events of one stream at a steady rate (W2's per-chunk path).

Each figure is the counter difference over a measured batch divided by its size, so
start-up and warm-up are left out (``callgrind_control --zero`` before, ``--dump`` after).
Instructions are not time (a cache miss costs more than an instruction), but fewer
instructions on the same path is less work, measured to well under 1%. Compare commits
with ``--tree`` pointing at a ``git archive`` of the other commit.

Needs valgrind (``apt-get install -y valgrind``); runs in about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.client import open_stream, request_bytes
from bench.systems import HERE, free_port, raise_nofile, relay_env, start_upstream

WARMUP_REQUESTS = 100
STARTUP_SECONDS = 180.0  # the relay's imports run some 50 times slower under valgrind


def _total(out: Path) -> int:
    """The instruction total of a callgrind dump (its ``summary:`` or ``totals:`` line)."""
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


class Counted:
    """The relay under callgrind: zero its counters, run a batch, read what it executed."""

    def __init__(
        self, tree: Path, upstream_port: int, workdir: Path, extra: dict[str, str], metrics: bool
    ) -> None:
        self.port = free_port()
        self.workdir = workdir
        env = relay_env(upstream_port, self.port)
        env["PYTHONPATH"] = str(tree)
        env.update(extra)
        argv = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/cg.%p",
            sys.executable, "-m", "bench.relay_server", "--metrics", "on" if metrics else "off",
        ]  # fmt: skip
        self._log = (workdir / "relay.log").open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=tree, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=raise_nofile,
        )  # fmt: skip

    async def started(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "relay.log").read_text()[-2000:])
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            writer.close()
            return
        raise RuntimeError("the relay did not start under valgrind")

    def _control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.proc.pid)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def zero(self) -> None:
        self._control("--zero")

    def dump(self, keep: Path | None = None) -> int:
        """Instructions executed since the last zero; the dump is copied to ``keep``."""
        before = set(self.workdir.glob("cg.*"))
        self._control("--dump")
        (out,) = set(self.workdir.glob("cg.*")) - before
        if keep is not None:
            shutil.copy(out, keep)
        return _total(out)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


async def _requests(port: int, count: int) -> None:
    """W5's request, one at a time, each on a new connection, read to its end."""
    request = request_bytes(port, "mode=sse&n=1&pad=40")
    for _ in range(count):
        stream = await open_stream(port, request)
        await asyncio.wait_for(stream.done, 60)
        if stream.status != 200:
            raise RuntimeError(f"status {stream.status}")


async def _events(port: int, count: int, rate: float) -> None:
    request = request_bytes(port, f"mode=sse&n={count}&rate={rate}&pad=40")
    stream = await open_stream(port, request)
    await asyncio.wait_for(stream.done, count / rate * 4 + 60)
    if stream.status != 200:
        raise RuntimeError(f"status {stream.status}")


async def measure(
    tree: Path,
    requests: int,
    events: int,
    rate: float,
    keep: Path | None = None,
    env: dict[str, str] | None = None,
    metrics: bool = True,
) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-instr-"))
    upstream, upstream_port = start_upstream(workdir, None)
    relay = Counted(tree, upstream_port, workdir, env or {}, metrics)
    try:
        await relay.started()
        await _requests(relay.port, WARMUP_REQUESTS)
        relay.zero()
        await _requests(relay.port, requests)
        per_request = relay.dump(keep and keep / "callgrind.requests") / requests
        # One stream: its request, and its events at W2's per-stream rate. A second
        # stream twice as long tells the per-event cost apart from the per-request one.
        relay.zero()
        await _events(relay.port, events, rate)
        short = relay.dump()
        relay.zero()
        await _events(relay.port, 2 * events, rate)
        long = relay.dump(keep and keep / "callgrind.events")
        per_event = (long - short) / events
    finally:
        relay.stop()
        upstream.terminate()
        upstream.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"instructions_per_request": per_request, "instructions_per_event": per_event}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="checkout to measure")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument(
        "--keep", type=Path, help="a folder to keep the callgrind dumps in (callgrind_annotate)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set for the relay, e.g. RELAY_LOG_LEVEL=warning to leave out the request log",
    )
    parser.add_argument("--metrics", choices=("on", "off"), default="on", help="as W6 runs it")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install -y valgrind")
    result = asyncio.run(
        measure(
            args.tree.resolve(),
            args.requests,
            args.events,
            args.rate,
            args.keep,
            dict(e.split("=", 1) for e in args.env),
            args.metrics == "on",
        )
    )
    result["tree"] = str(args.tree)
    print(json.dumps({k: round(v) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # hash-order effects stay out of the counts
    main()
