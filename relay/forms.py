"""Reading one field of a multipart upload without holding the upload in memory.

The upload is spooled (memory up to a small size, then a temporary file) and forwarded as
its original bytes; :func:`form_field` scans it block by block for the part named
``name`` and returns that part's (small) value. Memory stays within a few blocks whatever
the upload's size or where in it the field comes.
"""

from __future__ import annotations

import re
from typing import IO

BLOCK = 64 * 1024
MAX_PART_HEADERS = 16 * 1024
_NAME = re.compile(rb'(?im)^content-disposition:[^\r\n]*?;\s*name="([^"]*)"')


def form_field(stream: IO[bytes], boundary: str, name: str, limit: int = 4096) -> str | None:
    """The value of the first part called ``name``, or None (absent, or over ``limit``)."""
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    data = b"\r\n" + stream.read(BLOCK)  # the first delimiter has no CRLF before it
    position = 0
    while True:
        found = data.find(delimiter, position)
        if found == -1:
            more = stream.read(BLOCK)
            if not more:
                return None
            data = data[-(len(delimiter) - 1) :] + more
            position = 0
            continue
        start = found + len(delimiter)
        data, end = _until(stream, data, b"\r\n\r\n", start, MAX_PART_HEADERS)
        if end == -1 or data[start : start + 2] == b"--":
            return None  # the closing delimiter, or a part without an end to its headers
        match = _NAME.search(data, start, end)
        if match is not None and match.group(1).decode("utf-8", "replace") == name:
            value_start = end + 4
            data, value_end = _until(stream, data, delimiter, value_start, limit)
            if value_end == -1:
                return None
            return data[value_start:value_end].decode("utf-8", "replace")
        position = end + 4


def _until(
    stream: IO[bytes], data: bytes, marker: bytes, start: int, limit: int
) -> tuple[bytes, int]:
    """Read on until ``marker`` appears after ``start``, within ``limit`` bytes of it."""
    while (index := data.find(marker, start)) == -1:
        if len(data) - start > limit:
            return data, -1
        more = stream.read(BLOCK)
        if not more:
            return data, -1
        data += more
    return data, index if index - start <= limit else -1
