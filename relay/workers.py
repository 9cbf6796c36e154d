"""``relay serve --workers N``: a supervisor and N worker processes on one port.

The supervisor binds the public socket once and hands it to each worker (they all accept on
it), serves the admin listener itself with the workers' metrics summed (Prometheus
multiprocess mode; the active-streams gauge summed over live workers), restarts a worker
that dies, and on SIGTERM turns ``/readyz`` to 503, passes the signal on, and waits for the
workers' own drains before it exits 0. The workers' metrics files go to
``PROMETHEUS_MULTIPROC_DIR``, or to a temporary folder of the supervisor's own, removed
when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from relay.config import Config
from relay.health import create_admin_app
from relay.server import CUT_SETTLE_SECONDS, bind, listen, stopped_by_signals, url_of

logger = structlog.get_logger("relay.workers")

LISTEN_FD_ENV = "RELAY_LISTEN_FD"  # set by the supervisor for its workers only
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_BACKOFF_SECONDS = 1.0


def inherited_socket(environ: dict[str, str]) -> socket.socket | None:
    """In a worker: the supervisor's listening socket."""
    fd = environ.get(LISTEN_FD_ENV)
    return None if fd is None else socket.socket(fileno=int(fd))


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str], environ: dict[str, str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.environ = environ
        self.draining = False
        self._procs: dict[int, asyncio.subprocess.Process] = {}

    async def run(self) -> None:
        config = self.config
        sock = bind(config.host, config.port)
        configured = self.environ.get(METRICS_DIR_ENV)
        metrics_dir = _fresh_metrics_dir(configured)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
        admin = web.AppRunner(create_admin_app(self, registry), access_log=None)
        try:
            await admin.setup()
            admin_site = web.TCPSite(admin, config.admin_host, config.admin_port)
            await listen(admin_site, f"{config.admin_host}:{config.admin_port}", "RELAY_ADMIN_PORT")
            stop = asyncio.Event()
            with stopped_by_signals(stop):
                await self._supervise(sock, metrics_dir, url_of(admin), stop)
        finally:
            sock.close()
            await admin.cleanup()
            if configured is None:  # a folder of its own: nothing reads its files after it
                shutil.rmtree(metrics_dir, ignore_errors=True)

    async def _supervise(
        self, sock: socket.socket, metrics_dir: Path, admin_url: str, stop: asyncio.Event
    ) -> None:
        """Run the workers until ``stop`` is set, then drain them."""
        config = self.config
        sock.set_inheritable(True)
        env = {**self.environ, METRICS_DIR_ENV: str(metrics_dir), LISTEN_FD_ENV: str(sock.fileno())}
        slots = [
            asyncio.create_task(self._keep_running(slot, env, sock, metrics_dir))
            for slot in range(config.workers)
        ]
        host, port = sock.getsockname()[:2]
        logger.info(
            "relay_started",
            url=f"http://{host}:{port}",
            admin_url=admin_url,
            workers=config.workers,
            upstream=config.upstream_url,
            allowed_models=list(config.allowed_models),
        )
        try:
            await stop.wait()
            self.draining = True
            logger.info("draining", workers=len(self._procs), grace_s=config.shutdown_grace)
            for proc in list(self._procs.values()):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            deadline = config.shutdown_grace + CUT_SETTLE_SECONDS + 5
            _, pending = await asyncio.wait(slots, timeout=deadline)
            for proc in list(self._procs.values()):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for task in slots:
                task.cancel()
            await asyncio.gather(*slots, return_exceptions=True)
            logger.info("relay_stopped")

    async def _keep_running(
        self, slot: int, env: dict[str, str], sock: socket.socket, metrics_dir: Path
    ) -> None:
        while True:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", *self.argv, env=env, pass_fds=(sock.fileno(),)
            )
            self._procs[slot] = proc
            logger.info("worker_started", slot=slot, pid=proc.pid)
            code = await proc.wait()
            del self._procs[slot]
            mark_process_dead(proc.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
            if self.draining:
                logger.info("worker_stopped", slot=slot, pid=proc.pid, code=code)
                return
            logger.error("worker_died", slot=slot, pid=proc.pid, code=code)
            await asyncio.sleep(RESTART_BACKOFF_SECONDS)  # a crash loop must not spin


def _fresh_metrics_dir(configured: str | None) -> Path:
    metrics_dir = Path(configured or tempfile.mkdtemp(prefix="relay-metrics-"))
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # values of a previous run must not be summed
        stale.unlink()
    return metrics_dir


def worker_environment(environ: dict[str, str]) -> bool:
    return LISTEN_FD_ENV in environ
