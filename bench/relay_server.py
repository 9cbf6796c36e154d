"""The relay as the benchmark runs it: ``relay serve``, plus two things only the bench needs.

- ``--metrics off`` (W6): :class:`relay.metrics.RelayMetrics` is patched so a stream's
  meters are no-ops and ``finish`` records nothing; everything else is the real relay.
- ``--gc-tuned``: an experiment only (``python -m bench.profile --gc-tuned``).
- ``--trace FILE``: stamps the steps of each new request, written to ``FILE`` at exit
  (``python -m bench.trace``).
- ``SIGUSR1`` writes ``{"tasks": N, "streams": M}`` to ``$BENCH_STATS_FILE``: the open
  asyncio tasks and relay streams, so W7 can look for leaks from outside.

Configuration comes from the environment exactly as for ``relay serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
from pathlib import Path
from typing import Any

from relay import log, server
from relay.app import create_app
from relay.config import load_config
from relay.metrics import RelayMetrics
from relay.state import STATE


class _Nop:
    """A metric child that records nothing."""

    __slots__ = ()

    def observe(self, *_: Any) -> None:
        pass

    def inc(self, *_: Any) -> None:
        pass

    def dec(self, *_: Any) -> None:
        pass

    def set(self, *_: Any) -> None:
        pass


class _NopMeters:
    """Stands in for ``StreamMeters``: the same interface, recording nothing."""

    # Per chunk: a C callable that takes the two times and keeps nothing. A Python no-op
    # would run a frame per chunk, more than the compiled binning it stands in for costs.
    chunk = staticmethod(slice)

    def __init__(self) -> None:
        self.ttfb = self.active = self.bytes_in = _Nop()
        self.events: Any = None

    def close(self) -> None:
        pass


def metrics_off() -> None:
    RelayMetrics.stream = lambda self, model, exchange: _NopMeters()  # type: ignore[method-assign,assignment,return-value]
    RelayMetrics.finish = lambda self, exchange, duration: None  # type: ignore[method-assign]
    RelayMetrics.terminal = lambda self, model, terminal: None  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description="the relay, as the benchmark runs it")
    parser.add_argument("--metrics", choices=("on", "off"), default="on")
    parser.add_argument(
        "--gc-tuned",
        action="store_true",
        help="an experiment for bench.profile: gc.freeze() after start-up, rarer collections",
    )
    parser.add_argument("--trace", metavar="FILE", help="for bench.trace: per-request stamps")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = load_config(None, dict(os.environ), {}, require_key=True)
    log.configure(config.log_level, config.log_format, secrets=[config.api_key])
    if args.metrics == "off":
        metrics_off()
    if args.trace:
        from bench import trace

        trace.install(args.trace)
    stats_path = os.environ.get("BENCH_STATS_FILE")

    async def run() -> None:
        app = create_app(config)
        if stats_path:

            def dump() -> None:
                stats = {"tasks": len(asyncio.all_tasks()), "streams": len(app[STATE].streams)}
                tmp = Path(stats_path + ".tmp")
                tmp.write_text(json.dumps(stats))
                tmp.replace(stats_path)

            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)
        if args.gc_tuned:
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 100)
        await server.serve(config, app=app)

    server.run(run)


if __name__ == "__main__":
    main()
