"""Credentials in the configuration: the provider key, the token secret, the client keys.

Each may be given directly or as a file (container secrets); its value never enters a
message. :func:`load_credentials` returns the ``Config`` fields it found and appends every
problem to the caller's list.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

SECRET_SOURCES = (
    "WAVESPEED_API_KEY",
    "WAVESPEED_API_KEY_FILE",
    "RELAY_TOKEN_SECRET",
    "RELAY_TOKEN_SECRET_FILE",
    "RELAY_CLIENT_KEYS_FILE",
)
MIN_TOKEN_SECRET_BYTES = 32


def load_credentials(
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
    client_auth: Collection[str],
    problems: list[str],
    *,
    require_key: bool,
) -> dict[str, Any]:
    """``api_key``, ``token_secret`` and ``client_keys``, as far as they are configured."""
    values: dict[str, Any] = {}
    key = _load_key(environ, file_values, problems, require_key=require_key)
    if key:
        values["api_key"] = key
    secret = _secret(environ, file_values, "RELAY_TOKEN_SECRET", problems)
    if "token" in client_auth and len(secret.encode()) < MIN_TOKEN_SECRET_BYTES:
        problems.append(
            "RELAY_TOKEN_SECRET: RELAY_CLIENT_AUTH includes token, so a secret of at least "
            f"{MIN_TOKEN_SECRET_BYTES} bytes is required (or RELAY_TOKEN_SECRET_FILE)"
        )
    if secret:
        values["token_secret"] = secret  # also without token auth: `relay token` mints with it
    keys_file = _setting_value(environ, file_values, "RELAY_CLIENT_KEYS_FILE")
    if "key" in client_auth and not keys_file:
        problems.append("RELAY_CLIENT_KEYS_FILE: required when RELAY_CLIENT_AUTH includes key")
    if keys_file:
        values["client_keys"] = _client_keys(Path(keys_file), problems)
    return values


def _setting_value(environ: Mapping[str, str], file_values: Mapping[str, Any], env: str) -> str:
    for value in (
        environ.get(env),
        file_values.get(env.lower()),
        file_values.get(env.removeprefix("RELAY_").lower()),
    ):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _secret(
    environ: Mapping[str, str], file_values: Mapping[str, Any], env: str, problems: list[str]
) -> str:
    """A secret given directly or as ``<env>_FILE``; its value never enters a message."""
    direct = _setting_value(environ, file_values, env)
    path = _setting_value(environ, file_values, f"{env}_FILE")
    if direct and path:
        problems.append(f"{env}_FILE: set only one of {env} and {env}_FILE")
        return ""
    if not path:
        return direct
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{env}_FILE: cannot read {path!r}: {exc.strerror}")
        return ""


def _client_keys(path: Path, problems: list[str]) -> tuple[tuple[str, str], ...]:
    """Lines of ``<sha256-hex> <name>``; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        problems.append(f"RELAY_CLIENT_KEYS_FILE: cannot read {str(path)!r}: {exc.strerror}")
        return ()
    keys = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        digest, name = digest.lower(), name.strip()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            problems.append(f"RELAY_CLIENT_KEYS_FILE: line {number} is not '<sha256-hex> <name>'")
            continue
        keys.append((name, digest))
    if not keys and not problems:
        problems.append(f"RELAY_CLIENT_KEYS_FILE: {str(path)!r} holds no keys")
    return tuple(keys)


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
