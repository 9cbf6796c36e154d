"""A built-in stand-in for WaveSpeed's API, for the demo and for local development.

It speaks the shapes the relay must carry (see ``shared/reference``): OpenAI-style deltas
ending in ``data: [DONE]`` for ``wavespeed-ai/any-llm``, MiniMax-style JSON events with hex
audio and a final status event for the speech models, WaveSpeed progress events ending in
``complete``, raw ``audio/mpeg``, and task submission with prediction polling. It checks
the bearer key like the real API (any non-empty key when none is configured), so a relay
that forgot to inject it gets a 401 here too.

Pacing is realistic by default (``delay`` seconds between events); ``?delay=0`` disables it,
``?fail=1`` answers 500, ``?cut=N`` drops the connection after N events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import struct
import uuid

from aiohttp import web

ANSWER = (
    "Streaming through a relay should feel exactly like streaming from the provider: "
    "the same bytes, as soon as they exist, and an error when the stream is cut."
)

MOCK_KEY = web.AppKey("mock_key", str)
TASKS = web.AppKey("mock_tasks", dict)


def create_mock_app(api_key: str = "") -> web.Application:
    app = web.Application()
    app[MOCK_KEY] = api_key
    app[TASKS] = {}
    app.middlewares.append(_check_key)
    app.router.add_post("/api/v3/predictions/{task_id}", _method_not_allowed)
    app.router.add_get("/api/v3/predictions/{task_id}", _prediction)
    app.router.add_get("/api/v3/predictions/{task_id}/result", _prediction)
    app.router.add_post("/api/v3/{model:.+}/stream", _stream)
    app.router.add_post("/api/v3/{model:.+}", _submit)
    return app


def _envelope(code: int, message: str, data: object = None) -> web.Response:
    return web.json_response({"code": code, "message": message, "data": data}, status=code)


@web.middleware
async def _check_key(request: web.Request, handler: object) -> web.StreamResponse:
    expected = request.app[MOCK_KEY]
    auth = request.headers.get("Authorization", "")
    token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
    if not token or (expected and token != expected):
        return _envelope(401, "Unauthorized: invalid API key")
    if request.query.get("fail"):
        return _envelope(500, "mock upstream failure (requested)")
    return await handler(request)  # type: ignore[operator, no-any-return]


async def _method_not_allowed(request: web.Request) -> web.Response:
    return _envelope(405, "method not allowed")


def _delay(request: web.Request, default: float) -> float:
    try:
        return max(0.0, float(request.query.get("delay", default)))
    except ValueError:
        return default


async def _stream(request: web.Request) -> web.StreamResponse:
    model = request.match_info["model"]
    await request.read()
    if model.startswith("minimax/") and request.query.get("format") == "mp3":
        return await _audio(request)
    if model.startswith("minimax/"):
        events = _speech_events()
    elif model.startswith("wavespeed-ai/any-llm"):
        events = _llm_events()
    else:
        events = _progress_events()
    return await _sse(request, events, _delay(request, 0.05))


async def _sse(request: web.Request, events: list[bytes], delay: float) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    response.headers["Cache-Control"] = "no-cache"
    await response.prepare(request)
    cut = int(request.query.get("cut", "0") or 0)
    with contextlib.suppress(ConnectionError):  # the reader left: stop generating
        for n, event in enumerate(events, 1):
            await response.write(event)
            if cut and n >= cut and request.transport is not None:
                request.transport.abort()
                return response
            if delay:
                await asyncio.sleep(delay)
        await response.write_eof()
    return response


def _data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _llm_events() -> list[bytes]:
    events = [
        _data({"choices": [{"index": 0, "delta": {"content": word + " "}}]})
        for word in ANSWER.split()
    ]
    return [*events, b"data: [DONE]\n\n"]


def _progress_events() -> list[bytes]:
    events = [_data({"type": "progress", "percentage": p}) for p in range(0, 100, 10)]
    return [*events, _data({"type": "complete", "outputs": ["https://example.invalid/out.png"]})]


def _tone(samples: int, start: int) -> bytes:
    return b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * (start + i) / 16000)))
        for i in range(samples)
    )


def _speech_events() -> list[bytes]:
    chunks = [_tone(1600, i * 1600) for i in range(10)]
    events = [
        _data({"data": {"audio": chunk.hex(), "status": 1}, "base_resp": {"status_code": 0}})
        for chunk in chunks
    ]
    final = {
        "data": {"audio": "", "status": 2},
        "extra_info": {"audio_length": 1000, "audio_format": "pcm", "audio_sample_rate": 16000},
        "base_resp": {"status_code": 0, "status_msg": "success"},
    }
    return [*events, _data(final)]


async def _audio(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
    await response.prepare(request)
    delay = _delay(request, 0.05)
    with contextlib.suppress(ConnectionError):
        for i in range(20):
            # Not a playable MP3: frame-sized chunks of a recognisable pattern.
            await response.write(bytes(itertools.islice(itertools.cycle(range(256)), i, i + 4096)))
            if delay:
                await asyncio.sleep(delay)
        await response.write_eof()
    return response


async def _submit(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        return _envelope(400, "request body is not JSON")
    if isinstance(payload, dict) and payload.get("stream") is True:
        return await _sse(request, _progress_events(), _delay(request, 0.05))
    task_id = uuid.uuid4().hex
    request.app[TASKS][task_id] = 0
    host = f"{request.scheme}://{request.host}"
    data = {
        "id": task_id,
        "model": request.match_info["model"],
        "status": "created",
        "outputs": [],
        "urls": {"get": f"{host}/api/v3/predictions/{task_id}/result"},
    }
    return _envelope(200, "success", data)


async def _prediction(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    tasks = request.app[TASKS]
    if task_id not in tasks:
        return _envelope(404, "prediction not found")
    tasks[task_id] += 1
    done = tasks[task_id] >= 2
    data = {
        "id": task_id,
        "status": "completed" if done else "processing",
        "outputs": ["https://example.invalid/output.png"] if done else [],
    }
    return _envelope(200, "success", data)
