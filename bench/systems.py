"""The systems under test, started as pinned subprocesses, and what /proc says about them.

Each system is a process tree on the SUT CPU with ``RLIMIT_NOFILE`` raised to its hard
limit: the relay (full metrics, and metrics off for W6), nginx with ``proxy_buffering off``
(when installed), and the naive FastAPI + httpx peer. ``direct`` is no process at all: the
client talks to the fake upstream.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PR_SET_PDEATHSIG = 1
NGINX_HINT = "apt-get update && apt-get install -y nginx"


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of these processes (threads included)."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes (threads included)."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime
        system += int(fields[12])  # stime
    return user / CLK_TCK, system / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when the harness dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the harness's finally still stops them
        pass


def _preexec(cpu: int | None) -> None:
    raise_nofile()
    pin(cpu)
    os.setpgrp()
    _die_with_parent()


@dataclass
class System:
    """One system under test: how to start it and which port the client targets."""

    name: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    measure_children: bool = False  # nginx: the workers do the work
    stats_file: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return tree(self.proc.pid) if self.measure_children else [self.proc.pid]

    def cpu(self) -> float:
        return cpu_seconds(self.pids)

    def rss(self) -> int:
        return rss_bytes(self.pids)

    def fds(self) -> int:
        return fd_count(self.pids)

    def tasks(self) -> int | None:
        """Open asyncio tasks in the relay (its launcher dumps them on SIGUSR1)."""
        if self.stats_file is None or self.proc is None:
            return None
        self.stats_file.unlink(missing_ok=True)
        os.kill(self.proc.pid, signal.SIGUSR1)
        for _ in range(100):
            if self.stats_file.exists():
                try:
                    return int(json.loads(self.stats_file.read_text())["tasks"])
                except (ValueError, KeyError):
                    pass
            time.sleep(0.02)
        return None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {timeout}s: {log.read_text()[-2000:]}")


def _listening(system: System, log: Path, timeout: float) -> System:
    """``system`` once its port accepts connections; stopped, and the error raised, if not."""
    assert system.proc is not None
    try:
        _wait_listening(system.port, system.proc, log, timeout)
    except Exception:
        system.stop()
        raise
    return system


def _spawn(
    name: str,
    argv: list[str],
    env: dict[str, str],
    workdir: Path,
    cpu: int | None,
    cwd: Path = HERE.parent,
) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            preexec_fn=lambda: _preexec(cpu),  # the harness starts no threads
        )
    return proc, log


def relay_env(upstream_port: int, port: int) -> dict[str, str]:
    """The relay's environment: a fake key, the fake upstream, and limits that admit the
    benchmark's single loopback client (all streams share one client address)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        WAVESPEED_API_KEY="fake-bench-key",
        RELAY_UPSTREAM_URL=f"http://127.0.0.1:{upstream_port}",
        RELAY_ALLOWED_MODELS="wavespeed-ai/any-llm",
        RELAY_HOST="127.0.0.1",
        RELAY_PORT=str(port),
        RELAY_ADMIN_PORT=str(free_port()),
        RELAY_MAX_STREAMS="20000",
        RELAY_MAX_STREAMS_PER_CLIENT="20000",
        RELAY_RATE_LIMIT="100000/second",
        RELAY_LOG_LEVEL="info",
        RELAY_SHUTDOWN_GRACE="2",
    )
    return env


def speedups_built(tree: Path) -> bool:
    """Whether the relay in ``tree`` has its compiled per-chunk code (``relay._speedups``) for
    this Python, building them in place first if the tree can: a ``git archive`` copy
    (``bench.ab``, ``bench.instructions --tree``) has only the C source, and measuring it
    without the module would measure the pure-Python fallback."""
    module = tree / "relay" / ("_speedups" + EXTENSION_SUFFIXES[0])
    if not module.exists() and (tree / "relay" / "_speedups.c").exists():
        build = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=tree, capture_output=True, text=True,
        )  # fmt: skip
        if build.returncode != 0:
            raise RuntimeError(f"building relay._speedups in {tree} failed:\n{build.stderr}")
    return module.exists()


def start_relay(
    name: str,
    upstream_port: int,
    workdir: Path,
    cpu: int | None,
    *,
    metrics: bool,
    extra_args: tuple[str, ...] = (),
    tree: Path = HERE.parent,
    extra_env: dict[str, str] | None = None,
) -> System:
    """The relay as ``bench.relay_server`` runs it, from this checkout or from ``tree`` (a
    copy of another commit, for ``python -m bench.ab``), with ``extra_env`` set for it."""
    port = free_port()
    stats = workdir / f"{name}.stats.json"
    env = relay_env(upstream_port, port) | (extra_env or {})
    env["BENCH_STATS_FILE"] = str(stats)
    env["PYTHONPATH"] = str(tree)
    speedups_built(tree)
    argv = [sys.executable, "-m", "bench.relay_server", "--metrics", "on" if metrics else "off"]
    argv += extra_args
    proc, log = _spawn(name, argv, env, workdir, cpu, cwd=tree)
    return _listening(System(name, port, proc, workdir, stats_file=stats), log, 30)


def start_floor(upstream_port: int, workdir: Path, cpu: int | None) -> System:
    """``bench/peers/floor.py``: the relay's upstream client behind a bare server protocol
    (``python -m bench.floor``)."""
    port = free_port()
    env = relay_env(upstream_port, port)
    env["PYTHONPATH"] = str(HERE.parent)
    argv = [sys.executable, "-m", "bench.peers.floor"]
    proc, log = _spawn("floor", argv, env, workdir, cpu)
    return _listening(System("floor", port, proc, workdir), log, 30)


def start_naive(upstream_port: int, workdir: Path, cpu: int | None) -> System:
    port = free_port()
    env = dict(os.environ)
    env.update(NAIVE_UPSTREAM_URL=f"http://127.0.0.1:{upstream_port}", WAVESPEED_API_KEY="fake")
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.peers.naive_fastapi:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backlog",
        "4096",
    ]
    proc, log = _spawn("naive", argv, env, workdir, cpu)
    return _listening(System("naive", port, proc, workdir), log, 30)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_argv(upstream_port: int, port: int, workdir: Path, *, directives: str = "") -> list[str]:
    """The command that runs nginx from ``nginx.conf.template`` on ``port``, with any
    main-context ``directives`` put first (``master_process off;`` for one process)."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError(NGINX_HINT)
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    (prefix / "logs").mkdir(exist_ok=True)
    conf = (HERE / "nginx.conf.template").read_text()
    conf = conf.replace("{prefix}", str(prefix))
    conf = conf.replace("{port}", str(port)).replace("{upstream_port}", str(upstream_port))
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(directives + conf)
    return [binary, "-p", str(prefix), "-c", str(conf_path)]


def start_nginx(upstream_port: int, workdir: Path, cpu: int | None) -> System:
    port = free_port()
    argv = nginx_argv(upstream_port, port, workdir)
    proc, log = _spawn("nginx", argv, dict(os.environ), workdir, cpu)
    return _listening(System("nginx", port, proc, workdir, measure_children=True), log, 10)


def start_upstream(workdir: Path, cpu: int | None) -> tuple[subprocess.Popen[bytes], int]:
    log = workdir / "upstream.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=HERE.parent,
            preexec_fn=lambda: _preexec(cpu),  # the harness starts no threads
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"fake upstream did not start: {log.read_text()[-2000:]}")
    return proc, int(json.loads(line)["port"])
