"""structlog configuration, called once from the CLI (never on import).

One JSON object per line on stdout (``console`` for development). The standard library's
records (aiohttp's, asyncio's) go through the same processors, so they are JSON too and
carry the request id bound in contextvars. A redaction step runs last before rendering:
anything equal to a configured secret, or shaped like a bearer credential, is replaced.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[REDACTED]"
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_NESTED = (dict, list, tuple)  # a tuple, not a union: isinstance checks it without a lookup


class Redactor:
    """Replace secrets and bearer-shaped credentials in every string of a record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(s for s in secrets if len(s) >= 4)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if " " not in text and text.isprintable():  # no whitespace at all: nothing bearer-
            return text  # shaped (most values: ids, routes, models), and no regex to run
        return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._value(v) for v in value]
        return value

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        # One look at all the strings together first: the usual record (ids, a route, a
        # model, numbers) holds no secret, no whitespace and nothing unprintable, and then
        # no value can need scrubbing. The separator is printable and not whitespace, so
        # it changes neither test; a secret it completes only sends us the long way.
        strings: list[str] = []
        for value in event_dict.values():
            if isinstance(value, str):
                strings.append(value)
            elif isinstance(value, _NESTED):
                break  # nested values: one by one
        else:
            joined = "|".join(strings)
            if " " not in joined and joined.isprintable():
                for secret in self._secrets:
                    if secret in joined:
                        break
                else:
                    return event_dict
        # In place: structlog hands each processor chain a fresh dict.
        for key, value in event_dict.items():
            if isinstance(value, str):
                event_dict[key] = self.scrub(value)
            elif isinstance(value, _NESTED):
                event_dict[key] = self._value(value)
        return event_dict


class UtcStamper:
    """structlog's ``TimeStamper(fmt="iso", utc=True)``, to the character, for half the
    work: the date and the time of day are formatted once a second, not per record."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micro = nanos // 1000  # rounded down, as datetime.now() does
        # as datetime.isoformat() writes it: no fraction at all when it is zero
        event_dict["timestamp"] = f"{self._prefix}.{micro:06d}Z" if micro else f"{self._prefix}Z"
        return event_dict


def _json_fallback(value: Any) -> Any:
    """What JSON cannot hold: its ``__structlog__()`` if it has one, else its ``repr``
    (structlog's own fallback)."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


def _dumps(event_dict: EventDict, **_: Any) -> str:
    """A record as compact JSON, and ASCII whatever stdout's encoding: orjson renders it,
    and the standard library (which escapes) takes the rare record that orjson would write
    with other characters, or refuses (a lone surrogate, as a token's claims or a foreign
    record may hold; an integer past 64 bits)."""
    try:
        text = orjson.dumps(event_dict, default=_json_fallback).decode()
    except orjson.JSONEncodeError:
        pass
    else:
        if text.isascii():
            return text
    return json.dumps(event_dict, default=_json_fallback, separators=(",", ":"))


class _Output:
    """Where records go. Loggers cached on first use keep this object, and ``configure``
    retargets it, so a later configuration (tests make several) is honoured."""

    def __init__(self) -> None:
        self.file: TextIO = sys.stdout

    def write(self, text: str) -> None:
        self.file.write(text)

    def flush(self) -> None:
        self.file.flush()


_OUTPUT = _Output()


class _NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger that knows its name, for the ``logger`` field."""

    def __init__(self, name: str) -> None:
        super().__init__(_OUTPUT)  # type: ignore[arg-type]  # a file in all that is used
        self.name = name


def _logger_factory(*args: Any) -> _NamedWriteLogger:
    return _NamedWriteLogger(str(args[0]) if args else "relay")


def configure(
    level: str = "info",
    fmt: str = "json",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Route structlog and the standard library through one pipeline to ``stream`` (stdout)."""
    stream = sys.stdout if stream is None else stream
    _OUTPUT.file = stream
    redactor = Redactor(secrets)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        UtcStamper(),
        structlog.processors.format_exc_info,
        redactor,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    # The relay's own records are rendered and written directly: the standard library's
    # records, handlers and locks would cost more than the rest of a request's bookkeeping.
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=_logger_factory,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One canonical record per request is ours; aiohttp's access log would be a second.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
