"""Which requests the relay forwards, decided from the raw request path alone.

Pure functions: no I/O, no aiohttp. :func:`resolve` turns a method and the request-target
exactly as the client sent it into a :class:`Target` (or raises a :class:`RelayError`), and
:class:`Allowlist` says whether a model may be used. The upstream path is rebuilt from the
validated pieces, never copied from the request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.errors import BadRequest, MethodNotAllowed, NotFound

PREFIX = "/api/v3/"
MAX_MODEL_LENGTH = 200

_SEGMENT = r"[a-z0-9][a-z0-9._-]*"
_MODEL_ID = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_PATTERN = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*(?:/\*)?")
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Everything a well-formed path may contain; anything else (%, ;, NUL, spaces...) is rejected.
_PATH_CHARS = re.compile(r"[A-Za-z0-9/._-]*")
_DOT_SEGMENTS = frozenset({"", ".", ".."})  # never a segment of a relayed path

POLLING_MODEL = "-"


@dataclass(frozen=True, slots=True)
class Target:
    """A validated relayed request: its route label, model and upstream path."""

    route: str  # "stream" | "submit" | "prediction" | "result"
    model: str  # the model id, or "-" on polling routes
    path: str  # upstream path, built only from validated pieces
    query: str  # the raw query string, forwarded as sent ("" when absent)
    task_id: str | None = None
    takes_slot: bool = True  # counts against the stream limits (polling does not)


def is_valid_model(model: str) -> bool:
    return len(model) <= MAX_MODEL_LENGTH and _MODEL_ID.fullmatch(model) is not None


def is_valid_task_id(task_id: str) -> bool:
    return _TASK_ID.fullmatch(task_id) is not None


def is_valid_pattern(pattern: str) -> bool:
    return len(pattern) <= MAX_MODEL_LENGTH and _PATTERN.fullmatch(pattern) is not None


def resolve(method: str, raw_target: str) -> Target:
    """Validate a request-target and say where it goes, before anything else happens."""
    raw_path, _, query = raw_target.partition("?")
    if not raw_path.startswith(PREFIX):
        if raw_path.startswith("/"):
            raise NotFound("no relayed route at this path")
        raise BadRequest("the request target must be an absolute path")
    check_raw_path(raw_path)

    rest = raw_path[len(PREFIX) :]
    segments = rest.split("/")
    if segments[0] == "predictions":
        return _prediction(method, segments, query)

    is_stream = len(segments) > 1 and segments[-1] == "stream"
    model = "/".join(segments[:-1]) if is_stream else rest
    if not is_valid_model(model):
        raise BadRequest("malformed model id: segments are [a-z0-9][a-z0-9._-]*, '/'-separated")
    if method != "POST":
        raise MethodNotAllowed(f"{method} is not allowed here; use POST", allow=("POST",))
    suffix = "/stream" if is_stream else ""
    return Target(
        route="stream" if is_stream else "submit",
        model=model,
        path=f"{PREFIX}{model}{suffix}",
        query=query,
    )


def check_raw_path(raw_path: str) -> None:
    """Refuse percent-encoding, odd characters, and empty, '.' or '..' segments."""
    if _PATH_CHARS.fullmatch(raw_path) is None:
        raise BadRequest("the path contains characters outside the model id grammar")
    if not _DOT_SEGMENTS.isdisjoint(raw_path[1:].split("/")):
        raise BadRequest("the path has an empty, '.' or '..' segment")


def _prediction(method: str, segments: list[str], query: str) -> Target:
    if len(segments) == 2:
        route = "prediction"
    elif len(segments) == 3 and segments[2] == "result":
        route = "result"
    else:
        raise NotFound("no relayed route at this path")
    task_id = segments[1]
    if not is_valid_task_id(task_id):
        raise BadRequest("malformed task id")
    if method != "GET":
        raise MethodNotAllowed(f"{method} is not allowed here; use GET", allow=("GET",))
    suffix = "/result" if route == "result" else ""
    return Target(
        route=route,
        model=POLLING_MODEL,
        path=f"{PREFIX}predictions/{task_id}{suffix}",
        query=query,
        task_id=task_id,
        takes_slot=False,
    )


class Allowlist:
    """Exact model ids plus ``family/*`` patterns (which allow any id under ``family/``)."""

    __slots__ = ("_exact", "_prefixes", "patterns")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        self._exact = frozenset(p for p in patterns if not p.endswith("/*"))
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith("/*"))

    def allows(self, model: str) -> bool:
        return model in self._exact or model.startswith(self._prefixes)

    def label(self, model: str) -> str:
        """The metric label of an allowed model: its id, or the ``family/*`` it matched.

        Labelling a family match by its pattern keeps label sets as small as the allowlist.
        """
        if model in self._exact:
            return model
        return next(prefix + "*" for prefix in self._prefixes if model.startswith(prefix))
