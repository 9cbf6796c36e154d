"""Configuration: validated, frozen data loaded once from flags, environment and a TOML file.

Precedence is command-line flag > environment > file > default. Every problem is collected
and raised together in one :class:`ConfigError`, each naming its variable; secret values
are never part of a message or a ``repr``.

TOML files use the environment variable names without the ``RELAY_`` prefix, in lower case
(``upstream_url``, ``allowed_models``, ``port``; ``wavespeed_api_key_file`` for the key).
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from yarl import URL

from relay import policy
from relay.credentials import SECRET_SOURCES, load_credentials
from relay.routes import Route, parse_routes, upstream_url

DEFAULT_MODELS = (
    "minimax/speech-02-hd",
    "minimax/speech-02-turbo",
    "minimax/speech-2.5-hd-preview",
    "minimax/speech-2.5-turbo-preview",
    "minimax/speech-2.6-hd",
    "minimax/speech-2.6-turbo",
    "minimax/music-02",
    "wavespeed-ai/any-llm",
    "wavespeed-ai/any-llm/vision",
)

REDACTED = "<redacted>"


class ConfigError(Exception):
    """Every problem found in one configuration, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Config:
    """The relay's whole configuration. ``api_key`` never appears in ``repr``."""

    api_key: str = field(default="", repr=False)
    upstream_url: str = "https://api.wavespeed.ai"
    allowed_models: tuple[str, ...] = DEFAULT_MODELS
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9091
    log_level: str = "info"
    log_format: str = "json"
    connect_timeout: float = 10.0
    first_byte_timeout: float = 300.0
    idle_timeout: float = 120.0
    max_stream_seconds: float = 3600.0
    max_body_bytes: int = 1_048_576
    shutdown_grace: float = 60.0
    workers: int = 1
    # Access control (browser-facing)
    client_auth: frozenset[str] = frozenset()  # {"token", "key"}; empty means none
    token_secret: str = field(default="", repr=False)
    client_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (name, sha256)
    allowed_origins: tuple[str, ...] = ()
    rate_limit: tuple[int, float] = (60, 60.0)  # requests per window seconds
    max_streams_per_client: int = 4
    max_streams: int = 2000
    redis_url: str = field(default="", repr=False)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    allow_anonymous: bool = False
    prediction_ttl: float = 86400.0
    routes: tuple[Route, ...] = ()  # [[routes]] from the TOML file

    @property
    def admin_shares_public_listener(self) -> bool:
        """Equal ports mean one listener serves both (0, "any free port", never does)."""
        return self.admin_port == self.port != 0

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, with every secret replaced."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "routes":
                value = [route.redacted() for route in value]
            elif f.name == "redis_url" and value:
                value = _redact_url(value)
            elif f.name == "client_keys":
                value = [name for name, _ in value]
            elif f.name in SECRET_FIELDS:
                value = REDACTED if value else ""
            elif f.name == "client_auth":
                value = ",".join(sorted(value)) or "none"
            elif f.name == "rate_limit":
                value = f"{value[0]}/{_WINDOW_NAMES[value[1]]}"
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[f.name] = value
        return out


SECRET_FIELDS = frozenset({"api_key", "token_secret", "client_keys", "redis_url"})


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_WINDOWS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_WINDOW_NAMES = {v: k for k, v in _WINDOWS.items()}


def _redact_url(url: str) -> str:
    parsed = URL(url)
    return str(parsed.with_password(REDACTED)) if parsed.password else url


# --- parsers: each returns the parsed value or raises ValueError with a reason -------------


def _text(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    return raw.strip()


def _port(raw: Any) -> int:
    value = _integer(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _integer(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("must be an integer")
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError("must be an integer") from None


def _positive_int(raw: Any) -> int:
    value = _integer(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _seconds(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("must be a number of seconds")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError("must be a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive, finite number of seconds")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        value = _text(raw).lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _host(raw: Any) -> str:
    value = _text(raw)
    if not value:
        raise ValueError("must not be empty")
    return value


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    value = _text(raw).lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise ValueError("must be true or false")


def _client_auth(raw: Any) -> frozenset[str]:
    modes = {m.strip().lower() for m in _text(raw).split(",") if m.strip()}
    if modes == {"none"}:
        return frozenset()
    if not modes or not modes <= {"token", "key"}:
        raise ValueError("must be none, token, key, or token,key")
    return frozenset(modes)


def _origins(raw: Any) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    origins = tuple(str(item).strip().rstrip("/") for item in items if str(item).strip())
    for origin in origins:
        url = URL(origin)
        if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
    return origins


def _rate(raw: Any) -> tuple[int, float]:
    count, _, window = _text(raw).partition("/")
    if window not in _WINDOWS or not count.isdigit() or int(count) < 1:
        raise ValueError("must look like 60/minute (N/second, N/minute or N/hour)")
    return int(count), _WINDOWS[window]


def _networks(raw: Any) -> tuple[IPNetwork, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    try:
        return tuple(
            ipaddress.ip_network(str(item).strip(), strict=False)
            for item in items
            if str(item).strip()
        )
    except ValueError as exc:
        raise ValueError(f"must be comma-separated CIDRs ({exc})") from None


def _redis_url(raw: Any) -> str:
    value = _text(raw)
    if value and URL(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return value


def _models(raw: Any) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ValueError("must be a comma-separated list of model ids")
    models = tuple(str(item).strip() for item in items if str(item).strip())
    if not models:
        raise ValueError("must name at least one model")
    bad = [m for m in models if not policy.is_valid_pattern(m)]
    if bad:
        raise ValueError(f"not model ids or family/* patterns: {', '.join(map(repr, bad))}")
    return models


@dataclass(frozen=True, slots=True)
class _Setting:
    name: str  # Config field
    env: str  # environment variable
    parse: Callable[[Any], Any]

    @property
    def file_key(self) -> str:
        return self.env.removeprefix("RELAY_").lower()


SETTINGS = (
    _Setting("upstream_url", "RELAY_UPSTREAM_URL", upstream_url),
    _Setting("allowed_models", "RELAY_ALLOWED_MODELS", _models),
    _Setting("host", "RELAY_HOST", _host),
    _Setting("port", "RELAY_PORT", _port),
    _Setting("admin_host", "RELAY_ADMIN_HOST", _host),
    _Setting("admin_port", "RELAY_ADMIN_PORT", _port),
    _Setting("log_level", "RELAY_LOG_LEVEL", _choice("debug", "info", "warning", "error")),
    _Setting("log_format", "RELAY_LOG_FORMAT", _choice("json", "console")),
    _Setting("connect_timeout", "RELAY_CONNECT_TIMEOUT", _seconds),
    _Setting("first_byte_timeout", "RELAY_FIRST_BYTE_TIMEOUT", _seconds),
    _Setting("idle_timeout", "RELAY_IDLE_TIMEOUT", _seconds),
    _Setting("max_stream_seconds", "RELAY_MAX_STREAM_SECONDS", _seconds),
    _Setting("max_body_bytes", "RELAY_MAX_BODY_BYTES", _positive_int),
    _Setting("shutdown_grace", "RELAY_SHUTDOWN_GRACE", _seconds),
    _Setting("workers", "RELAY_WORKERS", _positive_int),
    _Setting("client_auth", "RELAY_CLIENT_AUTH", _client_auth),
    _Setting("allowed_origins", "RELAY_ALLOWED_ORIGINS", _origins),
    _Setting("rate_limit", "RELAY_RATE_LIMIT", _rate),
    _Setting("max_streams_per_client", "RELAY_MAX_STREAMS_PER_CLIENT", _positive_int),
    _Setting("max_streams", "RELAY_MAX_STREAMS", _positive_int),
    _Setting("redis_url", "RELAY_REDIS_URL", _redis_url),
    _Setting("trusted_proxies", "RELAY_TRUSTED_PROXIES", _networks),
    _Setting("allow_anonymous", "RELAY_ALLOW_ANONYMOUS", _bool),
    _Setting("prediction_ttl", "RELAY_PREDICTION_TTL", _seconds),
)


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    require_key: bool = True,
) -> Config:
    """Build the configuration from a TOML file, the environment and command-line overrides.

    ``environ`` is passed in (tests give a dict); nothing below reads ``os.environ``.
    ``overrides`` maps :class:`Config` field names to flag values; ``None`` values are unset.
    """
    environ = {} if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    problems: list[str] = []

    path = path or environ.get("RELAY_CONFIG") or None
    file_values = _read_file(Path(path), problems) if path else {}

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        source, raw = _pick(setting, overrides, environ, file_values)
        if source is None:
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            problems.append(f"{source}: {raw!r} {exc}")

    if "admin_host" not in values and "host" in values:
        values["admin_host"] = values["host"]

    values.update(
        load_credentials(
            environ,
            file_values,
            values.get("client_auth", frozenset()),
            problems,
            require_key=require_key,
        )
    )

    if "routes" in file_values:
        values["routes"] = parse_routes(file_values["routes"], environ, problems)

    config = Config(**values)
    problems.extend(_cross_checks(config))
    if problems:
        raise ConfigError(problems)
    return config


def _pick(
    setting: _Setting,
    overrides: Mapping[str, Any],
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
) -> tuple[str | None, Any]:
    if setting.name in overrides:
        return f"--{setting.name.replace('_', '-')}", overrides[setting.name]
    if setting.env in environ:
        return setting.env, environ[setting.env]
    if setting.file_key in file_values:
        return f"{setting.file_key} (config file)", file_values[setting.file_key]
    return None, None


def _read_file(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"RELAY_CONFIG: cannot read {str(path)!r}: {exc.strerror}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"RELAY_CONFIG: {str(path)!r} is not valid TOML: {exc}")
        return {}
    known = {s.file_key for s in SETTINGS} | {k.lower() for k in SECRET_SOURCES}
    known |= {k.removeprefix("RELAY_").lower() for k in SECRET_SOURCES} | {"routes"}
    problems.extend(
        f"{key} (config file): unknown setting" for key in sorted(data) if key not in known
    )
    return data


def _cross_checks(config: Config) -> list[str]:
    problems = []
    if config.first_byte_timeout > config.max_stream_seconds:
        problems.append(
            "RELAY_FIRST_BYTE_TIMEOUT: must not exceed RELAY_MAX_STREAM_SECONDS "
            f"({config.first_byte_timeout:g} > {config.max_stream_seconds:g})"
        )
    if not config.client_auth and not config.allow_anonymous and not is_loopback(config.host):
        problems.append(
            f"RELAY_CLIENT_AUTH: none on the non-loopback address {config.host!r} would let "
            "anyone spend the provider key; use token or key, or set RELAY_ALLOW_ANONYMOUS=true"
        )
    if config.workers > 1 and config.admin_shares_public_listener:
        problems.append(
            "RELAY_ADMIN_PORT: with RELAY_WORKERS > 1 the admin listener needs its own port "
            "(it reports the sum over all workers)"
        )
    if config.admin_shares_public_listener and config.admin_host != config.host:
        problems.append(
            "RELAY_ADMIN_HOST: must equal RELAY_HOST when RELAY_ADMIN_PORT equals RELAY_PORT "
            "(one listener serves both)"
        )
    return problems


def is_loopback(host: str) -> bool:
    """Whether a listen address only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
