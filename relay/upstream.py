"""The upstream side: the one ``ClientSession`` per app, and the one exception translator.

:func:`map_upstream_errors` is the only place where aiohttp client exceptions become
:class:`RelayError` s. Messages name the exception class only: the ``repr`` of an aiohttp
client error can include the request headers, and so the provider key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from relay.config import Config
from relay.errors import UpstreamTimeout, UpstreamUnavailable

# How much the client-side reader buffers before it pauses the upstream socket. Backpressure
# starts here: a stalled client stops our reads, and this bounds what sits in memory.
READ_BUFFER_BYTES = 2**16


def create_session(config: Config) -> aiohttp.ClientSession:
    """One pooled session for the app's lifetime, with the relay's own deadlines.

    aiohttp's 300 s ``total`` timeout is off (it would cut long streams); the connect
    deadline is aiohttp's, first byte, idle and maximum duration are the relay's
    (:class:`relay.pump.Watchdog`). No decompression: bytes pass as they came.
    """
    connector = aiohttp.TCPConnector(
        limit=0,  # the relay caps streams itself (RELAY_MAX_STREAMS); no hidden pool queue
        ttl_dns_cache=60,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=config.connect_timeout, sock_read=None
        ),
        auto_decompress=False,
        read_bufsize=READ_BUFFER_BYTES,
        # Only what the client sent goes upstream: no invented User-Agent or Content-Type.
        skip_auto_headers=("User-Agent", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


@contextmanager
def map_upstream_errors() -> Iterator[None]:
    """Translate a failure to open the upstream exchange into the relay's own error."""
    try:
        yield
    except TimeoutError as exc:
        raise UpstreamTimeout(f"upstream did not answer in time ({type(exc).__name__})") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(f"upstream unavailable ({type(exc).__name__})") from None
