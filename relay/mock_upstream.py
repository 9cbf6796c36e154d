"""A built-in stand-in for WaveSpeed's API, for the demo and for local development.

It speaks the shapes the relay must carry (see ``shared/reference``):

- ``POST /api/v3/{model}/stream``: MiniMax-style JSON events (``data.audio`` as hex of 16 kHz
  16-bit mono PCM, ``data.status`` 1, then a final status-2 event with ``extra_info``) for
  ``minimax/*``; OpenAI-style ``choices[0].delta.content`` events ending in ``data: [DONE]``
  for ``wavespeed-ai/any-llm*``; WaveSpeed progress events ending in ``complete`` otherwise.
  ``?format=mp3`` or ``?format=wav`` answers a raw ``audio/mpeg`` or ``audio/wav`` body.
- ``POST /api/v3/{model}``: task submission in the ``{"code", "message", "data"}`` envelope
  (status ``created``); with ``"stream": true`` in the body, progress events instead.
- ``GET /api/v3/predictions/{id}`` and ``.../result``: ``processing`` on the first poll,
  then ``completed`` with outputs (or ``failed``, for a task submitted with ``?fail=task``).

For the README's route examples it also speaks OpenAI-compatible gateways and a TTS vendor:
``POST /v1/chat/completions`` (chunks ending in ``data: [DONE]``), ``POST /v1/audio/speech``
(SSE with base64 audio, or raw ``audio/mpeg`` without ``"stream_format": "sse"``),
``POST /v1/audio/transcriptions`` (a multipart upload in, ``{"text"}`` events out) and
``POST /text-to-speech/stream`` (raw ``audio/mpeg``; its key may come as ``xi-api-key``).

It checks the bearer key like the real API (any non-empty key when none is configured), so a
relay that forgot to inject it gets a 401 here too.

Pacing is realistic by default: a pause before the first event (``?ttfb=SECONDS``) and
between events (``?delay=SECONDS``; ``?delay=0`` alone disables both). Errors on request:
``?fail=STATUS`` answers that status (``?fail=1``: 500) in the envelope, ``?cut=N`` drops
the connection after N events or chunks, ``?fail=task`` makes a submitted task fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import math
import struct
import sys
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

from aiohttp import web

ANSWER = (
    "Streaming through a relay should feel exactly like streaming from the provider: "
    "the same bytes, as soon as they exist, and an error when the stream is cut."
)
SAMPLE_RATE = 16000  # the speech events' PCM: 16 kHz, 16-bit little-endian, mono
SPEECH_CHUNK_SAMPLES = 1600  # 100 ms of audio per event
SPEECH_CHUNKS = 24
PROGRESS_STEP = 5  # percent per progress event
POLLS_TO_COMPLETE = 2  # the first poll sees "processing", the second "completed"

# Per shape: (seconds before the first event, seconds between events). Speech arrives a
# little faster than it plays, as a real text-to-speech stream does.
PACING = {"llm": (0.4, 0.045), "speech": (0.3, 0.07), "progress": (0.2, 0.12), "audio": (0.2, 0.05)}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Task:
    model: str
    created_at: float
    fail: bool
    polls: int = 0


MOCK_KEY = web.AppKey("mock_key", str)
TASKS = web.AppKey("mock_tasks", dict[str, Task])


def create_mock_app(api_key: str = "") -> web.Application:
    """The mock API; ``api_key`` is the only key it accepts (any non-empty one when empty)."""
    app = web.Application(middlewares=[_check_key])
    app[MOCK_KEY] = api_key
    app[TASKS] = {}
    app.router.add_post("/api/v3/predictions/{task_id}", _method_not_allowed)
    app.router.add_get("/api/v3/predictions/{task_id}", _prediction)
    app.router.add_get("/api/v3/predictions/{task_id}/result", _prediction)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/audio/speech", _speech)
    app.router.add_post("/v1/audio/transcriptions", _transcription)
    app.router.add_post("/text-to-speech/stream", _tts)
    app.router.add_post("/api/v3/{model:.+}/stream", _stream)
    app.router.add_post("/api/v3/{model:.+}", _submit)
    return app


def _envelope(code: int, message: str, data: object = None) -> web.Response:
    return web.json_response({"code": code, "message": message, "data": data}, status=code)


@web.middleware
async def _check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    expected = request.app[MOCK_KEY]
    auth = request.headers.get("Authorization", "")
    token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
    token = token or request.headers.get("xi-api-key", "").strip()  # a TTS vendor's header
    if not token or (expected and token != expected):
        return _envelope(401, "Unauthorized: invalid API key")
    fail = request.query.get("fail", "")
    if fail and fail != "task":
        status = int(fail) if fail.isdigit() and 400 <= int(fail) <= 599 else 500
        return _envelope(status, f"mock upstream failure (requested: {status})")
    return await handler(request)


async def _method_not_allowed(request: web.Request) -> web.Response:
    return _envelope(405, "method not allowed")


def pacing(query: Mapping[str, str], shape: str) -> tuple[float, float]:
    """(seconds before the first event, seconds between events) for a request's query."""

    def seconds(name: str, default: float) -> float:
        try:
            return max(0.0, float(query.get(name, default)))
        except ValueError:
            return default

    ttfb, delay = PACING[shape]
    if "delay" in query:
        delay = seconds("delay", delay)
        ttfb = delay  # ?delay=0 alone means no pacing at all
    return seconds("ttfb", ttfb), delay


async def _stream(request: web.Request) -> web.StreamResponse:
    model = request.match_info["model"]
    await request.read()
    audio_format = request.query.get("format")
    if model.startswith("minimax/") and audio_format in ("mp3", "wav"):
        return await _audio(request, audio_format)
    if model.startswith("minimax/"):
        return await _sse(request, speech_events(), "speech")
    if model.startswith("wavespeed-ai/any-llm"):
        return await _sse(request, llm_events(), "llm")
    return await _sse(request, progress_events(), "progress")


async def _chat(request: web.Request) -> web.StreamResponse:
    await request.read()
    return await _sse(request, llm_events(), "llm")


async def _speech(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    payload = json.loads(body or b"{}")
    if isinstance(payload, dict) and payload.get("stream_format") == "sse":
        chunks = audio_chunks("mp3")
        events = [_data({"audio": base64.b64encode(c).decode()}) for c in chunks]
        return await _sse(request, [*events, b"data: [DONE]\n\n"], "audio")
    return await _audio(request, "mp3")


async def _transcription(request: web.Request) -> web.StreamResponse:
    await request.read()  # a mock: the upload itself is not listened to
    words = ANSWER.split(" ")[:8]
    events = [_data({"text": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    return await _sse(request, [*events, b"data: [DONE]\n\n"], "llm")


async def _tts(request: web.Request) -> web.StreamResponse:
    await request.read()
    return await _audio(request, "mp3")


async def _paced_write(
    request: web.Request, response: web.StreamResponse, chunks: Iterator[bytes], shape: str
) -> None:
    """Write chunks at the shape's pace; honour ``?cut=N``; stop when the reader leaves."""
    ttfb, delay = pacing(request.query, shape)
    cut = int(request.query.get("cut", "0") or 0)
    with contextlib.suppress(ConnectionError):  # the reader left: stop generating
        for n, chunk in enumerate(chunks, 1):
            await asyncio.sleep(ttfb if n == 1 else delay)
            await response.write(chunk)
            if cut and n >= cut and request.transport is not None:
                request.transport.abort()  # no terminating chunk: a cut stream
                return
        await response.write_eof()


async def _sse(request: web.Request, events: list[bytes], shape: str) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    await _paced_write(request, response, iter(events), shape)
    return response


def _data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def llm_events() -> list[bytes]:
    """OpenAI-style chat completion chunks, one word each, then ``[DONE]``."""
    words = ANSWER.split(" ")
    head = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": "any-llm"}
    events = [
        _data({**head, "choices": [{"index": 0, "delta": {"content": text}}]})
        for text in [words[0], *(" " + word for word in words[1:])]
    ]
    last = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    return [*events, _data(last), b"data: [DONE]\n\n"]


def progress_events() -> list[bytes]:
    """WaveSpeed's stream events: progress percentages, then ``complete`` with outputs."""
    events = [_data({"type": "progress", "percentage": p}) for p in range(0, 100, PROGRESS_STEP)]
    done = {"type": "complete", "outputs": ["https://example.invalid/mock-output.png"]}
    return [*events, _data(done)]


@functools.cache
def speech_pcm() -> bytes:
    """A short chime as the "speech": pentatonic notes, each with a soft attack and decay."""
    notes = [523.25, 587.33, 659.25, 783.99, 880.0, 783.99, 659.25, 587.33]
    note_samples = SPEECH_CHUNK_SAMPLES * SPEECH_CHUNKS // 12
    samples = array("h")
    for i in range(SPEECH_CHUNK_SAMPLES * SPEECH_CHUNKS):
        note, t = divmod(i, note_samples)
        freq = notes[note % len(notes)]
        envelope = min(1.0, t / 160) * math.exp(-3.0 * t / note_samples)
        phase = 2 * math.pi * freq * t / SAMPLE_RATE
        samples.append(int(7000 * envelope * (math.sin(phase) + 0.3 * math.sin(2 * phase))))
    if sys.byteorder == "big":  # pragma: no cover - the wire format is little-endian
        samples.byteswap()
    return samples.tobytes()


def speech_events() -> list[bytes]:
    """MiniMax T2A streaming events: hex PCM chunks (status 1), then the final status 2."""
    pcm = speech_pcm()
    size = SPEECH_CHUNK_SAMPLES * 2
    events = [
        _data(
            {
                "data": {"audio": pcm[i : i + size].hex(), "status": 1},
                "trace_id": "mock-trace",
                "base_resp": {"status_code": 0, "status_msg": ""},
            }
        )
        for i in range(0, len(pcm), size)
    ]
    final = {
        "data": {"audio": "", "status": 2},
        "extra_info": {
            "audio_length": len(pcm) * 1000 // (2 * SAMPLE_RATE),
            "audio_sample_rate": SAMPLE_RATE,
            "audio_size": len(pcm),
            "audio_format": "pcm",
            "audio_channel": 1,
            "bitrate": SAMPLE_RATE * 16,
        },
        "trace_id": "mock-trace",
        "base_resp": {"status_code": 0, "status_msg": "success"},
    }
    return [*events, _data(final)]


def wav_header(data_size: int) -> bytes:
    """A RIFF/WAVE header for ``data_size`` bytes of the speech PCM."""
    return b"RIFF" + struct.pack(
        "<I4s4sIHHIIHH4sI",
        36 + data_size,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        1,  # mono
        SAMPLE_RATE,
        SAMPLE_RATE * 2,
        2,
        16,
        b"data",
        data_size,
    )


def audio_chunks(audio_format: str) -> list[bytes]:
    """The raw audio body, in the chunks the mock writes it (``mp3`` or ``wav``)."""
    if audio_format == "wav":
        pcm = speech_pcm()
        body = wav_header(len(pcm)) + pcm
    else:
        # Not a playable MP3: frame-sized chunks of every byte value, recognisable in tests.
        body = bytes(i % 256 for i in range(20 * 4096))
    return [body[i : i + 4096] for i in range(0, len(body), 4096)]


async def _audio(request: web.Request, audio_format: str) -> web.StreamResponse:
    content_type = "audio/wav" if audio_format == "wav" else "audio/mpeg"
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    await _paced_write(request, response, iter(audio_chunks(audio_format)), "audio")
    return response


async def _submit(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        return _envelope(400, "request body is not JSON")
    if isinstance(payload, dict) and payload.get("stream") is True:
        return await _sse(request, progress_events(), "progress")
    task_id = uuid.uuid4().hex
    model = request.match_info["model"]
    task = Task(model, time.time(), fail=request.query.get("fail") == "task")
    request.app[TASKS][task_id] = task
    return _envelope(200, "success", _task_data(request, task_id, task, "created"))


def _task_data(request: web.Request, task_id: str, task: Task, status: str) -> dict[str, object]:
    base = f"{request.scheme}://{request.host}/api/v3/predictions/{task_id}"
    data: dict[str, object] = {
        "id": task_id,
        "model": task.model,
        "status": status,
        "outputs": [],
        "urls": {"get": f"{base}/result"},
        "has_nsfw_contents": [],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(task.created_at)),
        "error": "",
        "timings": {"inference": 0},
    }
    if status == "completed":
        data["outputs"] = [f"https://example.invalid/{task_id}.png"]
        data["has_nsfw_contents"] = [False]
        data["timings"] = {"inference": 2500}
    elif status == "failed":
        data["error"] = "mock task failure (requested)"
    return data


async def _prediction(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    task = request.app[TASKS].get(task_id)
    if task is None:
        return _envelope(404, "prediction not found")
    task.polls += 1
    if task.polls < POLLS_TO_COMPLETE:
        status = "processing"
    else:
        status = "failed" if task.fail else "completed"
    return _envelope(200, "success", _task_data(request, task_id, task, status))
