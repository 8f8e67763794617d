"""The web chat page and the feedback it collects.

    GET  /                 the page (serve/page/index.html); /page/chat.js and /page/chat.css with it
    POST /v1/feedback      one rated reply: stored in the project-local feedback store (forgeline/feedback.py)

In Assistant mode the page talks to the service's own POST /v1/chat/completions (streaming), keeps its session id and
turns in the browser's localStorage, and posts a reply's whole state (thumb, better answer) on each
change; the store keeps every post, the last one of a reply id counts. `forgeline feedback export`
makes preference pairs of them (data/feedback/, DVC) for the next DPO run. In Documents mode
(serve/page/rag.js) questions go to POST /v1/rag/query and PDFs to /v1/rag/documents (serve/rag.py).

A /v1/feedback body: {"id", "session", "messages": [user/assistant turns the reply answered],
"reply", "rating": "up"|"down"|null, "better": str|null, "model", "model_version"}.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from forgeline.feedback import append_record, make_record

PAGE = Path(__file__).parent / "page"
ASSETS = {"chat.js": "text/javascript", "chat.css": "text/css",
          "rag.js": "text/javascript",       # Documents mode: questions to the RAG index (serve/rag.py)
          "compose.js": "text/javascript",   # Smart Compose ghost text (serve/compose.py)
          "images.js": "text/javascript"}    # the Images section (serve/images.py)
MAX_BODY = 256 * 1024    # bytes: a long conversation and its reply fit many times over
FIELDS = {"id", "session", "messages", "reply", "rating", "better", "model", "model_version"}

router = APIRouter()


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


async def json_object(request: Request, max_body: int) -> dict | JSONResponse:
    """The request's body as a JSON object, or OpenAI's error: 413 over `max_body` bytes, 400 not a JSON object."""
    body = await request.body()
    if len(body) > max_body:
        return error(413, f"body over {max_body} bytes", code="body_too_large")
    try:
        data = json.loads(body)
    except ValueError:
        return error(400, "the body is not JSON")
    if not isinstance(data, dict):
        return error(400, "the body must be a JSON object")
    return data


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(PAGE / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/page/{name}", include_in_schema=False)
def asset(name: str):
    if name not in ASSETS:   # a fixed list: no path from the URL reaches the file system
        return error(404, f"no page asset {name!r}")
    return FileResponse(PAGE / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


@router.post("/v1/feedback")
async def feedback(request: Request) -> JSONResponse:
    """Store one rated reply; 400 on a bad body, 413 on one over MAX_BODY bytes."""
    data = await json_object(request, MAX_BODY)
    if isinstance(data, JSONResponse):
        return data
    unknown = set(data) - FIELDS
    if unknown:
        return error(400, f"unknown fields: {sorted(unknown)}", param=sorted(unknown)[0])
    for name in ("id", "session", "reply"):
        if not isinstance(data.get(name), str):
            return error(400, f"{name} must be a string", param=name)
    for name in ("better", "model", "model_version"):
        if data.get(name) is not None and not isinstance(data[name], str):
            return error(400, f"{name} must be a string or null", param=name)
    if not isinstance(data.get("messages"), list) or not all(isinstance(m, dict) for m in data["messages"]):
        return error(400, "messages must be a list of {role, content} objects", param="messages")
    try:
        record = make_record(id=data["id"], session=data["session"], messages=data["messages"], reply=data["reply"],
                             rating=data.get("rating"), better=data.get("better"), model=data.get("model") or "",
                             model_version=data.get("model_version") or "")
    except ValueError as e:
        return error(400, str(e))
    await run_in_threadpool(append_record, record)   # an fsync: not on the event loop
    return JSONResponse({"object": "feedback", "id": record["id"], "time": record["time"], "stored": True})
