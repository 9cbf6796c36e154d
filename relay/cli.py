"""The ``relay`` command: parse -> load config -> configure logging -> run. Nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from relay import __version__, log, server, workers
from relay.access import mint_token
from relay.config import ConfigError, load_config
from relay.credentials import MIN_TOKEN_SECRET_BYTES

_OVERRIDES = (
    "host",
    "port",
    "admin_host",
    "admin_port",
    "upstream_url",
    "log_level",
    "log_format",
    "workers",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="A transparent streaming relay for AI inference APIs."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE", help="TOML file (or RELAY_CONFIG)")
        p.add_argument("--host", help="public listen address (RELAY_HOST)")
        p.add_argument("--port", help="public listen port (RELAY_PORT)")
        p.add_argument("--admin-host", help="admin listen address (RELAY_ADMIN_HOST)")
        p.add_argument("--admin-port", help="admin listen port (RELAY_ADMIN_PORT)")
        p.add_argument("--upstream-url", help="upstream origin (RELAY_UPSTREAM_URL)")
        p.add_argument("--log-level", help="debug, info, warning, error (RELAY_LOG_LEVEL)")
        p.add_argument("--log-format", help="json or console (RELAY_LOG_FORMAT)")
        p.add_argument("--workers", help="processes serving one port (RELAY_WORKERS)")
        return p

    with_config(commands.add_parser("serve", help="run the relay"))
    with_config(
        commands.add_parser(
            "check-config", help="validate the configuration and print it, secrets redacted"
        )
    )
    demo = commands.add_parser("demo", help="run the relay in front of the built-in mock upstream")
    demo.add_argument("--port", help="public port (RELAY_PORT, default 8080)")
    token = commands.add_parser(
        "token", help="mint a relay token (RELAY_TOKEN_SECRET or RELAY_TOKEN_SECRET_FILE)"
    )
    token.add_argument("--config", metavar="FILE", help="TOML file (or RELAY_CONFIG)")
    token.add_argument("--sub", required=True, help="the client id the token stands for")
    token.add_argument("--ttl", type=int, required=True, help="seconds until it expires")
    token.add_argument("--models", nargs="+", help="only these models or family/* patterns")
    token.add_argument("--origins", nargs="+", help="only from these browser origins")
    token.add_argument("--rpm", type=int, help="at most this many requests per minute")
    token.add_argument("--streams", type=int, help="at most this many concurrent streams")
    mock = commands.add_parser("mock-upstream", help="run only the built-in mock upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8090)
    mock.add_argument("--key", default="", help="the API key it expects (default: any)")
    return parser


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)  # what a worker is started with
    environ = dict(os.environ) if environ is None else environ
    try:
        return _run(args, argv, environ)
    except server.CannotListen as exc:  # a port in use: one line, not a traceback
        print(f"relay {args.command}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, argv: list[str], environ: dict[str, str]) -> int:
    if args.command == "mock-upstream":
        log.configure()
        server.run(lambda: server.serve_mock(args.host, args.port, args.key))
        return 0
    if args.command == "demo":
        from relay import demo  # the page and the mock load only when the demo runs

        return demo.main(args.port, environ)

    if args.command == "token":
        return _token(args, environ)

    overrides = {name: getattr(args, name) for name in _OVERRIDES}
    try:
        config = load_config(args.config, environ, overrides, require_key=True)
    except ConfigError as exc:
        print("relay: bad configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(json.dumps(config.redacted(), indent=2))
        return 0
    secrets = [config.api_key, config.token_secret, *(route.key for route in config.routes)]
    log.configure(config.log_level, config.log_format, secrets=secrets)
    if config.workers > 1 and not workers.worker_environment(environ):
        server.run(workers.Supervisor(config, argv, environ).run)
    else:
        sock = workers.inherited_socket(environ)
        server.run(lambda: server.serve(config, sock=sock, admin=sock is None))
    return 0


def _token(args: argparse.Namespace, environ: dict[str, str]) -> int:
    try:
        config = load_config(args.config, environ, require_key=False)
    except ConfigError as exc:
        print("relay token: bad configuration:", *exc.problems, sep="\n  - ", file=sys.stderr)
        return 2
    if len(config.token_secret.encode()) < MIN_TOKEN_SECRET_BYTES:
        print(
            f"relay token: RELAY_TOKEN_SECRET (or _FILE) of at least {MIN_TOKEN_SECRET_BYTES} "
            "bytes is required",
            file=sys.stderr,
        )
        return 2
    if args.ttl < 1:
        print("relay token: --ttl must be at least 1 second", file=sys.stderr)
        return 2
    print(
        mint_token(
            config.token_secret,
            args.sub,
            args.ttl,
            models=args.models,
            origins=args.origins,
            rpm=args.rpm,
            streams=args.streams,
        )
    )
    return 0
