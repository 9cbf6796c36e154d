"""``python -m bench.instructions``: what one new request and one relayed event cost the
relay, and nginx, in CPU instructions, counted by valgrind's callgrind rather than timed.

Timings on this shared machine drift by 10 to 20% between runs, which hides any change to
the per-request path smaller than that (W5). An instruction count does not drift: the same
code on the same inputs executes the same instructions whatever else the machine does. So
this runs each system under ``valgrind --tool=callgrind`` in front of the fake upstream
and, after a warm-up, counts:

- **per request**: W5's request (a new connection, one SSE event) sent one at a time;
- **per event**: the events of one stream at a steady rate (W2's per-chunk path).

Each figure is the counter difference over a measured batch divided by its size, so
start-up and warm-up are left out (``callgrind_control --zero`` before, ``--dump`` after).
User-space instructions only: the kernel's share (TCP on loopback, about the same for
both, see the README) is not counted. Instructions are not time (a cache miss costs more
than an instruction), but fewer instructions on the same path is less work, measured to
well under 1%. Compare commits with ``--tree`` pointing at a ``git archive`` of another.

With ``--split``, the relay's request is cut where its time to first byte is decided:
callgrind dumps its counters as uvloop accepts a connection, reads and writes, so each of
W5's requests (sent one at a time, with a pause after each) yields the instructions from
the accept to the request's bytes, from them to the upstream request's write, while the
upstream works, and from its answer to the client's first write. Whatever runs in the
third span delays no byte; the other three are the way to the first byte.

Needs valgrind (``apt-get install -y valgrind``); nginx is counted when installed, as one
process (``master_process off``). Runs in about a minute (``--split``: two).
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
from bench.harness import RESULTS
from bench.systems import (
    HERE,
    free_port,
    nginx_argv,
    nginx_binary,
    raise_nofile,
    relay_env,
    speedups_built,
    start_upstream,
)

WARMUP_REQUESTS = 100
STARTUP_SECONDS = 180.0  # the relay's imports run some 50 times slower under valgrind


def _total(out: Path) -> int:
    """The instruction total of a callgrind dump (its ``summary:`` or ``totals:`` line)."""
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


class Counted:
    """A system under callgrind: zero its counters, run a batch, read what it executed."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        port: int,
        workdir: Path,
        options: tuple[str, ...] = (),
    ) -> None:
        self.port = port
        self.workdir = workdir
        out = f"--callgrind-out-file={workdir}/cg.%p"
        argv = ["valgrind", "--tool=callgrind", out, *options, *argv]
        self._log_path = workdir / "system.log"
        self._log = self._log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=raise_nofile,
        )  # fmt: skip

    async def started(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self._log_path.read_text()[-2000:])
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            writer.close()
            return
        raise RuntimeError("the system did not start under valgrind")

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


def relay_system(
    tree: Path,
    upstream_port: int,
    workdir: Path,
    env: dict[str, str],
    metrics: bool,
    options: tuple[str, ...] = (),
) -> Counted:
    port = free_port()
    full_env = relay_env(upstream_port, port) | {"PYTHONPATH": str(tree)} | env
    speedups_built(tree)
    argv = [sys.executable, "-m", "bench.relay_server", "--metrics", "on" if metrics else "off"]
    return Counted(argv, full_env, tree, port, workdir, options)


# --split: where callgrind dumps, and what each span between two dumps is.
SPLIT_AT = {  # point: (uvloop's function, what a dump's trigger line names of it)
    "accept": ("__pyx_f_6uvloop_4loop___uv_streamserver_on_listen", "on_listen"),
    "read": ("__pyx_f_6uvloop_4loop___uv_stream_on_read", "on_read"),
    "write": ("__pyx_pw_6uvloop_4loop_8UVStream_*write*", "write"),  # write and writelines
}
SPANS = (  # a request's dumps after its accept, in order, and the span each one closes
    ("read", "from the accept to the request's bytes"),
    ("write", "from the request's bytes to the upstream request's write"),
    ("read", "while the upstream works (delays no byte)"),
    ("write", "from the upstream's answer to the client's first write"),
)
UPSTREAM_WORKS = SPANS[2][1]
TO_FIRST_BYTE = "to the first byte, in all"
SPLIT_PAUSE = 0.3  # after each request: its last work is done before the next one's accept


async def split(system: Counted, requests: int) -> dict[str, float]:
    """The instructions of each span of :data:`SPANS`, the fewest over ``requests`` (a
    request that formatted no new Date and ran no collection); their total to the first
    byte leaves out the upstream's span."""
    try:
        await system.started()
        await _requests(system.port, WARMUP_REQUESTS)
        await asyncio.sleep(SPLIT_PAUSE)
        before = set(system.workdir.glob("cg.*"))
        await _requests(system.port, requests, pause=SPLIT_PAUSE)
        dumps = sorted(
            set(system.workdir.glob("cg.*")) - before, key=lambda p: int(p.name.rsplit(".", 1)[1])
        )
    finally:
        system.stop()
    spans: list[list[int]] = [[] for _ in SPANS]
    position = len(SPANS)  # not inside a request until its accept
    for dump in dumps:
        text = dump.read_text(errors="replace")
        trigger = next(line for line in text.splitlines() if line.startswith("desc: Trigger:"))
        point = next((name for name, (_, mark) in SPLIT_AT.items() if mark in trigger), "")
        if point == "accept":
            position = 0
        elif position < len(SPANS) and point == SPANS[position][0]:
            spans[position].append(_total(dump))
            position += 1
    if not all(spans):
        raise RuntimeError("no request was split as expected")
    fewest = {label: float(min(counts)) for (_, label), counts in zip(SPANS, spans, strict=True)}
    fewest[TO_FIRST_BYTE] = sum(fewest[label] for _, label in SPANS if label != UPSTREAM_WORKS)
    return fewest


def nginx_system(upstream_port: int, workdir: Path) -> Counted:
    port = free_port()
    argv = nginx_argv(upstream_port, port, workdir, directives="master_process off;\n")
    return Counted(argv, dict(os.environ), workdir, port, workdir)


async def _requests(port: int, count: int, pause: float = 0.0) -> None:
    """W5's request, one at a time, each on a new connection, read to its end."""
    request = request_bytes(port, "mode=sse&n=1&pad=40")
    for _ in range(count):
        stream = await open_stream(port, request)
        await asyncio.wait_for(stream.done, 60)
        if stream.status != 200:
            raise RuntimeError(f"status {stream.status}")
        if pause:
            await asyncio.sleep(pause)  # the relay's work after the response ends, done


async def _events(port: int, count: int, rate: float) -> None:
    request = request_bytes(port, f"mode=sse&n={count}&rate={rate}&pad=40")
    stream = await open_stream(port, request)
    await asyncio.wait_for(stream.done, count / rate * 4 + 60)
    if stream.status != 200:
        raise RuntimeError(f"status {stream.status}")


async def count(
    system: Counted, requests: int, events: int, rate: float, keep: Path | None
) -> dict[str, float]:
    try:
        await system.started()
        await _requests(system.port, WARMUP_REQUESTS)
        system.zero()
        await _requests(system.port, requests)
        per_request = system.dump(keep and keep / "callgrind.requests") / requests
        # One stream: its request, and its events at the given rate. A second stream
        # twice as long tells the per-event cost apart from the per-request one.
        system.zero()
        await _events(system.port, events, rate)
        short = system.dump()
        system.zero()
        await _events(system.port, 2 * events, rate)
        long = system.dump(keep and keep / "callgrind.events")
    finally:
        system.stop()
    return {"per_request": per_request, "per_event": (long - short) / events}


async def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-instr-"))
    upstream, upstream_port = start_upstream(workdir, None)
    results = {}
    try:
        env = dict(e.split("=", 1) for e in args.env)
        tree, metrics = args.tree.resolve(), args.metrics == "on"
        if args.split:
            options = tuple(f"--dump-before={function}" for function, _ in SPLIT_AT.values())
            relay = relay_system(tree, upstream_port, workdir, env, metrics, options)
            return {"relay": await split(relay, args.requests)}
        relay = relay_system(tree, upstream_port, workdir, env, metrics)
        results["relay"] = await count(relay, args.requests, args.events, args.rate, args.keep)
        if nginx_binary() is not None and not args.no_nginx:
            nginx = nginx_system(upstream_port, workdir)
            results["nginx"] = await count(nginx, args.requests, args.events, args.rate, None)
    finally:
        upstream.terminate()
        upstream.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


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
    parser.add_argument("--no-nginx", action="store_true", help="count the relay only")
    parser.add_argument(
        "--split",
        action="store_true",
        help="the relay's request by span, up to its first byte (instructions-split.json)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install -y valgrind")
    results = asyncio.run(measure(args))
    if args.split:
        spans = results["relay"]
        for label, figure in spans.items():
            print(f"{figure:>10,.0f}  {label}")
        out = RESULTS / "instructions-split.json"
        out.write_text(json.dumps({"args": sys.argv[1:], "spans": spans}, indent=1) + "\n")
        print(f"written: {out}")
        return
    for name, figures in results.items():
        print(f"{name:6} {figures['per_request']:>10,.0f} instructions per request "
              f"{figures['per_event']:>8,.0f} per event")  # fmt: skip
    out = RESULTS / "instructions.json"
    out.write_text(json.dumps({"args": sys.argv[1:], "results": results}, indent=1) + "\n")
    print(f"written: {out}")
    if "nginx" in results:
        relay, nginx = results["relay"], results["nginx"]
        print(f"relay / nginx: {relay['per_request'] / nginx['per_request']:.1f}x per request, "
              f"{relay['per_event'] / nginx['per_event']:.1f}x per event")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # hash-order effects stay out of the counts
    main()
