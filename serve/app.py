"""One FastAPI app for every pipeline's endpoints: each pipeline adds a module `serve/<pipeline>.py`
with an `APIRouter` named `router` whose routes carry their full paths, OpenAI style (`/v1/chat/completions`,
`/v1/compose`, `/v1/translate`), and lists it in ROUTERS; create_app() mounts them all at the root,
tagged by pipeline, and refuses two pipelines claiming the same method and path. A plain list, read top
to bottom: no plugins, no discovery.

    forgeline serve [--host 127.0.0.1] [--port 8000]
    python -m uvicorn --factory serve.app:create_app --host 127.0.0.1 --port 8000
"""
from __future__ import annotations

from fastapi import APIRouter, FastAPI

from serve import caption, compose, images, page, rag, translate
from serve.llm import api as llm_api

# (pipeline, its router): e.g. ("rag", serve.rag.router) once the RAG pipeline serves queries
ROUTERS: list[tuple[str, APIRouter]] = []
ROUTERS.append(("page", page.router))   # the web chat page at / and POST /v1/feedback
ROUTERS.append(("llm", llm_api.router))   # OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models, /v1/moderations
ROUTERS.append(("compose", compose.router))   # Smart Compose: POST /v1/compose, one request per keystroke
ROUTERS.append(("translate", translate.router))   # POST /v1/translate: en->fr, en->es, beam search, per-sentence confidence
ROUTERS.append(("rag", rag.router))   # ChatPDF: POST /v1/rag/query, POST|GET /v1/rag/documents, DELETE /v1/rag/documents/{id}
ROUTERS.append(("caption", caption.router))   # POST /v1/caption: an uploaded image -> a beam-search caption, word-filtered
ROUTERS.append(("images", images.router))   # POST /v1/images/generations: gan | vq | t2i, OpenAI's images API


def create_app(routers: list[tuple[str, APIRouter]] | None = None) -> FastAPI:
    """The app with `routers` (default ROUTERS) mounted at the root, and GET /health."""
    app = FastAPI(title="Forgeline", summary="Every pipeline's online endpoints")

    @app.get("/health")
    def health() -> dict[str, object]:
        # what is mounted, so a deploy can check it serves the pipelines it should
        return {"status": "ok", "pipelines": [name for name, _ in mounted]}

    mounted = ROUTERS if routers is None else routers
    owner: dict[tuple[str, str], str] = {("GET", "/health"): "app"}
    for name, router in mounted:
        for route in router.routes:
            for method in getattr(route, "methods", None) or {"WS"}:
                key = (method, route.path)
                if key in owner:
                    raise ValueError(f"{method} {route.path} of pipeline {name!r} is already served by {owner[key]!r}")
                owner[key] = name
        app.include_router(router, tags=[name])
    return app
