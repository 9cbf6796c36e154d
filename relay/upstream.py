"""The upstream side: one pool of keep-alive connections per app, and the request head.

A request goes out in two steps, :meth:`Upstreams.send` and :meth:`Sent.response`, so the
relay can prepare the stream while the upstream works. They are the only place a failure
to reach the upstream becomes a :class:`~relay.errors.RelayError`; messages name an
exception class at most, never a header, so never the provider key. The connections themselves are
:class:`relay.connection.Connection` s: why the relay parses responses itself is told there.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import IO

from yarl import URL

from relay.connection import Connection, Origin, UpstreamClosed, UpstreamProtocolError
from relay.errors import UpstreamTimeout, UpstreamUnavailable

KEEPALIVE_SECONDS = 30.0  # an idle pooled connection is closed after this
DNS_TTL_SECONDS = 60.0  # how long resolved upstream addresses are reused
MAX_IDLE_PER_ORIGIN = 256  # idle connections kept per upstream; the rest close when released
IDEMPOTENT = frozenset({"GET", "PUT", "DELETE"})


class Upstreams:
    """Keep-alive connections to every upstream the routes name, one pool per app.

    A released connection waits up to ``keepalive`` seconds for its next exchange. Nothing
    limits how many are open at once: the relay caps its streams itself (``RELAY_MAX_STREAMS``),
    so there is no hidden queue here.
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        keepalive: float = KEEPALIVE_SECONDS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[Connection]] = {}
        self._resolved: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def send(
        self,
        method: str,
        origin: URL,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | IO[bytes],
        size: int,
    ) -> Sent:
        """Write a request for ``target`` (its path and query, sent as they are) to the
        upstream at ``origin`` (whose path is not used) on a pooled connection, or a new one;
        :meth:`Sent.response` waits for its answer. What the caller does in between costs its
        client nothing while the upstream works on the request (the relay prepares the stream
        then). A route passes the same ``origin`` object every time: yarl keeps what it
        derives from it, the pool key and the ``Host`` field."""
        key: Origin = (origin.scheme, origin.raw_host or "", origin.port or 0)
        sent = Sent(self, key, method, _request_head(method, origin, target, headers, size), body)
        await sent.send()
        return sent

    def put(self, connection: Connection) -> None:
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            connection.close()
            return
        loop = asyncio.get_running_loop()
        connection.idle_since = loop.time()
        connection.pooled = True
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._keepalive, self._sweep)

    def discard(self, connection: Connection) -> None:
        """A connection closed: if it was waiting in the pool, it no longer is."""
        if connection.pooled:
            connection.pooled = False
            self._idle[connection.origin].remove(connection)  # it is there while pooled

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            while idle:
                _unpooled(idle.pop()).close()

    def _checkout(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()  # the most recent: the least likely stale
            connection.pooled = False
            if connection.usable:
                return connection
        return None

    def _sweep(self) -> None:
        """Close connections idle longer than ``keepalive``; re-arm while any remain."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        expired_before = loop.time() - self._keepalive
        remaining = False
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= expired_before:
                _unpooled(idle.pop(0)).close()
            remaining = remaining or bool(idle)
        if remaining:
            self._sweeper = loop.call_later(self._keepalive / 2, self._sweep)

    async def _connect(self, origin: Origin) -> Connection:
        scheme, host, port = origin
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            tls = self._ssl_context
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                addresses = await self._resolve(host, port)
                for address in addresses:  # in the resolver's order, the next on a refusal
                    try:
                        _, connection = await loop.create_connection(
                            lambda: Connection(self, origin),
                            address,
                            port,
                            ssl=tls,
                            server_hostname=host if tls else None,
                        )
                        return connection
                    except OSError:
                        if address == addresses[-1]:
                            raise
        except TimeoutError:
            raise UpstreamTimeout("upstream did not accept a connection in time") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS verification
            self._resolved.pop((host, port), None)
            raise UpstreamUnavailable(f"upstream unavailable ({type(exc).__name__})") from None
        raise UpstreamUnavailable("upstream unavailable (no address)")

    async def _resolve(self, host: str, port: int) -> list[str]:
        """The upstream's addresses, cached for ``DNS_TTL_SECONDS``: new connections come in
        bursts (a reconnect, a wave of streams), and each would otherwise ask the resolver."""
        loop = asyncio.get_running_loop()
        cached = self._resolved.get((host, port))
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self._resolved[(host, port)] = (loop.time() + DNS_TTL_SECONDS, addresses)
        return addresses


class Sent:
    """A request written to the upstream, whose response head is still to come.

    A request on a reused connection that the upstream had already closed, before a byte
    of the response, is sent again on a new one if its method is idempotent: the stale
    connection shows itself either as the write fails or as the response never comes.
    """

    __slots__ = (
        "_body", "_head", "_method", "_on_head", "_origin", "_pool", "_reused", "connection",
    )  # fmt: skip

    def __init__(
        self, pool: Upstreams, origin: Origin, method: str, head: bytes, body: bytes | IO[bytes]
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._method = method
        self._head = head
        self._body = body
        self._reused = False
        self._on_head: Callable[[Connection], None] | None = None
        self.connection: Connection | None = None

    def when_answered(self, on_head: Callable[[Connection], None]) -> None:
        """Call ``on_head`` from the socket callback that completes the response head,
        before the body that came with it (:attr:`Connection.on_head`); also on the
        connection a stale one is replaced with."""
        self._on_head = on_head
        if self.connection is not None:
            self.connection.on_head = on_head

    async def send(self) -> None:
        """Write the request on a pooled connection, or a new one; again on another after
        a stale one."""
        while True:
            connection = self._pool._checkout(self._origin)
            self._reused = connection is not None
            if connection is None:
                connection = await self._pool._connect(self._origin)
            self.connection = connection
            connection.on_head = self._on_head
            try:
                await connection.send(self._head, self._body)
                return
            except (UpstreamClosed, UpstreamProtocolError, OSError) as exc:
                self._failed(connection, exc)
            except BaseException:
                connection.close()  # cancelled (a deadline, or the client left): not reusable
                raise

    async def response(self) -> Connection:
        """The connection, once the response's status line and headers are in."""
        while True:
            connection = self.connection
            assert connection is not None, "send() first"
            try:
                await connection.head()
                self._body = b""  # never sent again: let a large upload go
                return connection
            except (UpstreamClosed, UpstreamProtocolError, OSError) as exc:
                self._failed(connection, exc)
            except BaseException:
                connection.close()
                raise
            await self.send()

    def _failed(self, connection: Connection, exc: Exception) -> None:
        """Close ``connection``; raise unless the request may go again on another."""
        connection.close()
        if self._reused and not connection.received_any and _resendable(self._method, self._body):
            return  # the pooled connection was already gone: nothing reached it
        raise UpstreamUnavailable(f"upstream unavailable ({type(exc).__name__})") from None


def _unpooled(connection: Connection) -> Connection:
    connection.pooled = False
    return connection


def _resendable(method: str, body: bytes | IO[bytes]) -> bool:
    return method in IDEMPOTENT and isinstance(body, bytes)


def _request_head(
    method: str, origin: URL, target: str, headers: Iterable[tuple[str, str]], size: int
) -> bytes:
    """The request line and headers, with ``Host`` and the body's ``Content-Length``."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.host_port_subcomponent}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if size or method not in ("GET", "DELETE"):
        lines.append(f"Content-Length: {size}")
    lines.append("\r\n")
    head = "\r\n".join(lines)
    # Every line ends in exactly one CR LF of the joins: any other CR, LF or NUL came with a
    # header and would start a line of its own. aiohttp's parser and llhttp already refuse
    # these, and so does the configuration; this is the last guard, one scan per character.
    breaks = len(lines)
    if head.count("\r") != breaks or head.count("\n") != breaks or "\0" in head:
        raise ValueError("a header with a line break")
    return head.encode("utf-8", "surrogateescape")
