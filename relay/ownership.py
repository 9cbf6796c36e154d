"""Prediction ownership: which client submitted which task, read from the response as it
passes. The tap sees each chunk after it was forwarded and keeps at most ``LIMIT`` bytes
of a submission's JSON answer; the bytes to the client are never touched.
"""

from __future__ import annotations

import json

from relay.policy import is_valid_task_id

LIMIT = 64 * 1024  # a submission answer is a small envelope; a larger body is not one


class SubmissionTap:
    """Collects a task submission's response to find its ``data.id``."""

    __slots__ = ("_body", "_overflow")

    def __init__(self) -> None:
        self._body = bytearray()
        self._overflow = False

    def __call__(self, chunk: bytes) -> None:
        if not self._overflow:
            self._body += chunk
            if len(self._body) > LIMIT:
                self._overflow = True
                self._body.clear()

    def task_id(self) -> str | None:
        """The submitted task's id, if the body was a WaveSpeed envelope carrying one."""
        if self._overflow:
            return None
        try:
            envelope = json.loads(self._body)
        except ValueError:
            return None
        data = envelope.get("data") if isinstance(envelope, dict) else None
        task_id = data.get("id") if isinstance(data, dict) else None
        return task_id if isinstance(task_id, str) and is_valid_task_id(task_id) else None
