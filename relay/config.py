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

    @property
    def admin_shares_public_listener(self) -> bool:
        """Equal ports mean one listener serves both (0, "any free port", never does)."""
        return self.admin_port == self.port != 0

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, with every secret replaced."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                value = REDACTED if value else ""
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


SECRET_FIELDS = frozenset({"api_key"})


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


def _upstream_url(raw: Any) -> str:
    value = _text(raw)
    try:
        url = URL(value)
    except ValueError:
        raise ValueError("is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// origin, with an optional base path")
    if url.user or url.password:
        raise ValueError("must not carry credentials")
    if url.query_string or url.fragment:
        raise ValueError("must not have a query or fragment")
    return value.rstrip("/")


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
    _Setting("upstream_url", "RELAY_UPSTREAM_URL", _upstream_url),
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
)
_BY_NAME = {s.name: s for s in SETTINGS}
_KEY_SOURCES = ("WAVESPEED_API_KEY", "WAVESPEED_API_KEY_FILE")


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

    key = _load_key(environ, file_values, problems, require_key=require_key)
    if key:
        values["api_key"] = key

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
    known = {s.file_key for s in SETTINGS} | {k.lower() for k in _KEY_SOURCES}
    problems.extend(
        f"{key} (config file): unknown setting" for key in sorted(data) if key not in known
    )
    return data


def _load_key(
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
    problems: list[str],
    *,
    require_key: bool,
) -> str:
    def get(name: str) -> str:
        value = environ.get(name, file_values.get(name.lower(), ""))
        return value.strip() if isinstance(value, str) else ""

    key, key_file = get("WAVESPEED_API_KEY"), get("WAVESPEED_API_KEY_FILE")
    if key and key_file:
        problems.append("WAVESPEED_API_KEY_FILE: set only one of WAVESPEED_API_KEY and it")
        return ""
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(f"WAVESPEED_API_KEY_FILE: cannot read {key_file!r}: {exc.strerror}")
            return ""
        if not key:
            problems.append(f"WAVESPEED_API_KEY_FILE: {key_file!r} is empty")
    elif require_key and not key:
        problems.append("WAVESPEED_API_KEY: required (or WAVESPEED_API_KEY_FILE)")
    if (key and any(c in key for c in "\r\n\0")) or (key and not key.isprintable()):
        problems.append("WAVESPEED_API_KEY: contains control characters")
        return ""
    return key


def _cross_checks(config: Config) -> list[str]:
    problems = []
    if config.first_byte_timeout > config.max_stream_seconds:
        problems.append(
            "RELAY_FIRST_BYTE_TIMEOUT: must not exceed RELAY_MAX_STREAM_SECONDS "
            f"({config.first_byte_timeout:g} > {config.max_stream_seconds:g})"
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


def setting_for(name: str) -> str:
    """The environment variable behind a :class:`Config` field, for messages."""
    return _BY_NAME[name].env
