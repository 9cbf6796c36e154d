"""The relay as tutorials write it: FastAPI, one ``httpx.AsyncClient``, ``StreamingResponse``.

This is the baseline the relay must beat by 4x on CPU per event. It is deliberately the
common shape, not a tuned one, with two exceptions so it can take part at all: the httpx
pool has no connection cap (the default of 100 would queue every stream past the 100th),
and the query string is forwarded (the benchmark's fake upstream reads it).

Run by the harness as ``uvicorn bench.peers.naive_fastapi:app``. uvloop and httptools are
installed (httptools as a dependency of the relay), so uvicorn uses both, as it does when
installed as ``uvicorn[standard]``, the way tutorials install it.
"""

from __future__ import annotations

import os

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

UPSTREAM = os.environ.get("NAIVE_UPSTREAM_URL", "https://api.wavespeed.ai")
API_KEY = os.environ.get("WAVESPEED_API_KEY", "")

client = httpx.AsyncClient(
    base_url=UPSTREAM,
    timeout=None,  # noqa: S113 - streams are long; this is how the tutorials write it
    limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000),
)
app = FastAPI()


@app.post("/api/v3/{model_id:path}/stream")
async def stream(model_id: str, request: Request) -> StreamingResponse:
    body = await request.body()
    upstream_request = client.build_request(
        "POST",
        f"/api/v3/{model_id}/stream",
        params=request.query_params,
        content=body,
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "Content-Type": request.headers.get("content-type", "application/json"),
        },
    )
    upstream = await client.send(upstream_request, stream=True)
    return StreamingResponse(
        upstream.aiter_raw(),
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type"),
        background=BackgroundTask(upstream.aclose),
    )
