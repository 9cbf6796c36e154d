"""Routes: which public paths go to which upstream, with which key, allowlist and policy.

The default WaveSpeed route (``/api/v3``) comes from the SPEC's environment variables;
more come from ``[[routes]]`` tables in the TOML file. Each is a frozen :class:`Route`, and
:class:`Router` resolves a raw request-target to ``(route, target)`` or raises a relay error.
Configured routes relay only their listed paths, matched exactly after the same raw-path
validation as the WaveSpeed routes; a path may hold one ``{model}`` placeholder.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from relay import policy
from relay.errors import MethodNotAllowed, NotFound
from relay.policy import Allowlist, Target

MODEL_SOURCES = ("path", "json", "form", "none")
DISCONNECT_POLICIES = ("cancel", "drain")
RESERVED_NAMES = frozenset({"stream", "submit", "prediction", "result", "preflight", "-"})
RESERVED_PREFIXES = ("/api/v3", "/healthz", "/readyz", "/metrics", "/static")

DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
RESOLVED_KEPT = 1024  # request-targets whose resolution is remembered ...
RESOLVED_KEPT_LENGTH = 256  # ... those no longer than this: the memo holds a MiB at most
DEFAULT_DRAIN_MAX_BYTES = 64 * 1024 * 1024

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_PUBLIC_PATH = re.compile(rf"(?:/{_SEGMENT})+")
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# Models named in bodies follow the providers' own spelling (upper case, ':' and '@' occur).
_BODY_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*(?:/[A-Za-z0-9][A-Za-z0-9._:@-]*)*")


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream the relay fronts, and how."""

    name: str
    prefix: str  # public path prefix ("" for the WaveSpeed route, which resolves itself)
    upstream: str  # origin and optional base path
    key: str = field(repr=False)
    auth_header: str = "Authorization"
    model_from: str = "path"
    allowed_models: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("POST",)
    on_disconnect: str = "cancel"
    sse_heartbeat: float | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    drain_max_bytes: int = DEFAULT_DRAIN_MAX_BYTES

    @property
    def auth_value(self) -> str:
        return f"Bearer {self.key}" if self.auth_header.lower() == "authorization" else self.key

    def redacted(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "key"}
        out["key"] = "<redacted>" if self.key else ""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What each request of a route needs of its upstream, worked out once per route."""

    origin: URL  # the upstream: yarl keeps what it derives from it (pool key, Host field)
    base_path: str  # put before each request's path: "" or, say, "/v1"
    auth: tuple[str, str] = field(repr=False)  # the field that carries the key, with the key

    @classmethod
    def of(cls, route: Route) -> Endpoint:
        origin = URL(route.upstream, encoded=True)
        base_path = origin.raw_path.rstrip("/")
        return cls(origin, base_path, (route.auth_header, route.auth_value))


def upstream_url(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    value = raw.strip()
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


def is_valid_body_model(model: str) -> bool:
    return len(model) <= policy.MAX_MODEL_LENGTH and _BODY_MODEL.fullmatch(model) is not None


class Router:
    """Resolves request-targets; the WaveSpeed route first, then configured prefixes."""

    def __init__(self, wavespeed: Route, routes: tuple[Route, ...]) -> None:
        self.wavespeed = wavespeed
        self.routes = routes
        self.allowlists = {r.name: Allowlist(r.allowed_models) for r in (wavespeed, *routes)}
        self.endpoints = {r.name: Endpoint.of(r) for r in (wavespeed, *routes)}
        self._matchers = [(r, [_matcher(r.prefix, p) for p in r.paths]) for r in routes]
        # Resolving is a pure function of the method and target, and a stream's target is
        # the same for every request to its model: remembered, it is one lookup in C.
        self._remembered = functools.lru_cache(maxsize=RESOLVED_KEPT)(self._resolve)

    def resolve(self, method: str, raw_target: str) -> tuple[Route, Target]:
        """The route and validated target of a request; raises the relay error to answer."""
        if len(raw_target) <= RESOLVED_KEPT_LENGTH:
            return self._remembered(method, raw_target)  # refusals raise, and are not kept
        return self._resolve(method, raw_target)

    def _resolve(self, method: str, raw_target: str) -> tuple[Route, Target]:
        raw_path, _, query = raw_target.partition("?")
        if raw_path.startswith(policy.PREFIX) or not raw_path.startswith("/"):
            return self.wavespeed, policy.resolve(method, raw_target)
        for route, matchers in self._matchers:
            if raw_path != route.prefix and not raw_path.startswith(route.prefix + "/"):
                continue
            policy.check_raw_path(raw_path)
            for suffix_pattern in matchers:
                match = suffix_pattern.fullmatch(raw_path)
                if match is None:
                    continue
                if method not in route.methods:
                    raise MethodNotAllowed(f"{method} is not allowed here", allow=route.methods)
                model = match.groupdict().get("model") or policy.POLLING_MODEL
                upstream_path = raw_path[len(route.prefix) :]
                return route, Target(route.name, model, upstream_path, query)
            raise NotFound(f"{raw_path!r} is not one of the paths relayed under {route.prefix}")
        raise NotFound("no relayed route at this path")


def _matcher(prefix: str, path: str) -> re.Pattern[str]:
    pattern = re.escape(prefix + path).replace(re.escape("{model}"), f"(?P<model>{_SEGMENT})")
    return re.compile(pattern)


def parse_routes(raw: Any, environ: Mapping[str, str], problems: list[str]) -> tuple[Route, ...]:
    """``[[routes]]`` tables into routes; every problem named ``routes[i].field``."""
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        problems.append("routes (config file): must be an array of tables ([[routes]])")
        return ()
    routes = [_parse_route(i, item, environ, problems) for i, item in enumerate(raw)]
    parsed = tuple(r for r in routes if r is not None)
    names = [r.name for r in parsed]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"routes: the name {name!r} is used twice")
    prefixes = sorted(r.prefix for r in parsed)
    for a, b in itertools.pairwise(prefixes):
        if b == a or b.startswith(a + "/"):
            problems.append(f"routes: the prefixes {a!r} and {b!r} overlap")
    return parsed


_KNOWN = {
    "name", "prefix", "upstream", "key_env", "key_file", "auth_header", "model_from",
    "allowed_models", "paths", "methods", "on_disconnect", "sse_heartbeat",
    "max_upload_bytes", "drain_max_bytes",
}  # fmt: skip


def _parse_route(
    index: int, item: dict[str, Any], environ: Mapping[str, str], problems: list[str]
) -> Route | None:
    where = f"routes[{index}]"
    count = len(problems)
    problems.extend(f"{where}.{key}: unknown setting" for key in sorted(set(item) - _KNOWN))

    def need(key: str, kind: type) -> Any:
        value = item.get(key)
        if not isinstance(value, kind):
            problems.append(f"{where}.{key}: required, a {kind.__name__}")
            return None
        return value

    name = need("name", str)
    if name is not None and (_NAME.fullmatch(name) is None or name in RESERVED_NAMES):
        problems.append(f"{where}.name: {name!r} must be [a-z0-9][a-z0-9_-]* and not reserved")
    prefix = need("prefix", str)
    if prefix is not None:
        prefix = prefix.rstrip("/")
        if _PUBLIC_PATH.fullmatch(prefix) is None or prefix.startswith(RESERVED_PREFIXES):
            problems.append(f"{where}.prefix: {prefix!r} must be a path like /v1, not reserved")
    upstream = need("upstream", str)
    if upstream is not None:
        try:
            upstream = upstream_url(upstream)
        except ValueError as exc:
            problems.append(f"{where}.upstream: {upstream!r} {exc}")
    key = _route_key(where, item, environ, problems)
    auth_header = item.get("auth_header", "Authorization")
    if not isinstance(auth_header, str) or _HEADER_NAME.fullmatch(auth_header) is None:
        problems.append(f"{where}.auth_header: must be a header name")
    model_from = item.get("model_from", "json")
    if model_from not in MODEL_SOURCES:
        problems.append(f"{where}.model_from: must be one of {', '.join(MODEL_SOURCES)}")
    models = item.get("allowed_models", [])
    if not isinstance(models, list) or not all(
        isinstance(m, str) and (is_valid_body_model(m.removesuffix("/*"))) for m in models
    ):
        problems.append(f"{where}.allowed_models: must be a list of model ids or family/*")
    elif model_from in ("path", "json", "form") and not models:
        problems.append(f"{where}.allowed_models: required when model_from is {model_from!r}")
    paths = need("paths", list) or []
    for path in paths:
        bare = path.replace("{model}", "m") if isinstance(path, str) else ""
        if _PUBLIC_PATH.fullmatch(bare) is None:
            problems.append(f"{where}.paths: {path!r} is not a path like /chat/completions")
        elif (path.count("{model}") == 1) != (model_from == "path"):
            problems.append(
                f"{where}.paths: {path!r} needs one {{model}} exactly when model_from is path"
            )
    methods = item.get("methods", ["POST"])
    if not isinstance(methods, list) or not set(methods) <= {"GET", "POST", "PUT", "DELETE"}:
        problems.append(f"{where}.methods: a list of GET, POST, PUT, DELETE")
    on_disconnect = item.get("on_disconnect", "cancel")
    if on_disconnect not in DISCONNECT_POLICIES:
        problems.append(f"{where}.on_disconnect: must be cancel or drain")
    heartbeat = item.get("sse_heartbeat")
    if heartbeat is not None and (
        isinstance(heartbeat, bool) or not isinstance(heartbeat, int | float) or heartbeat <= 0
    ):
        problems.append(f"{where}.sse_heartbeat: seconds, a positive number")
    limits = {}
    for limit in ("max_upload_bytes", "drain_max_bytes"):
        value = item.get(limit)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            problems.append(f"{where}.{limit}: a positive number of bytes")
        limits[limit] = value
    if len(problems) > count:
        return None
    return Route(
        name=name,
        prefix=prefix,
        upstream=upstream,
        key=key,
        auth_header=auth_header,
        model_from=model_from,
        allowed_models=tuple(models),
        paths=tuple(paths),
        methods=tuple(methods),
        on_disconnect=on_disconnect,
        sse_heartbeat=None if heartbeat is None else float(heartbeat),
        max_upload_bytes=limits["max_upload_bytes"] or DEFAULT_MAX_UPLOAD_BYTES,
        drain_max_bytes=limits["drain_max_bytes"] or DEFAULT_DRAIN_MAX_BYTES,
    )


def _route_key(
    where: str, item: dict[str, Any], environ: Mapping[str, str], problems: list[str]
) -> str:
    key_env, key_file = item.get("key_env"), item.get("key_file")
    if (key_env is None) == (key_file is None):
        problems.append(f"{where}.key_env: set exactly one of key_env and key_file")
        return ""
    if key_env is not None:
        value = environ.get(str(key_env), "").strip()
        if not value:
            problems.append(f"{where}.key_env: the variable {key_env!r} is not set")
        return value
    try:
        value = Path(str(key_file)).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{where}.key_file: cannot read {key_file!r}: {exc.strerror}")
        return ""
    if not value:
        problems.append(f"{where}.key_file: {key_file!r} is empty")
    return value
