"""structlog configuration, called once from the CLI (never on import).

One JSON object per line on stdout (``console`` for development). The standard library's
records (aiohttp's, asyncio's) go through the same processors, so they are JSON too and
carry the request id bound in contextvars. A redaction step runs last before rendering:
anything equal to a configured secret, or shaped like a bearer credential, is replaced.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[REDACTED]"
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")


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
        # In place: structlog hands each processor chain a fresh dict. Most values of the
        # canonical record are numbers, which need no look at all.
        for key, value in event_dict.items():
            if isinstance(value, str):
                event_dict[key] = self.scrub(value)
            elif isinstance(value, dict | list | tuple):
                event_dict[key] = self._value(value)
        return event_dict


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
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redactor,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
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
