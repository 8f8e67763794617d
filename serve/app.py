"""One FastAPI app for every pipeline's endpoints: each pipeline adds a module `serve/<pipeline>.py`
with an `APIRouter` named `router` and lists it in ROUTERS; create_app() mounts them all, each
under its own prefix `/<pipeline>`. A plain list, read top to bottom: no plugins, no discovery.

    forgeline serve [--host 127.0.0.1] [--port 8000]
    python -m uvicorn --factory serve.app:create_app --host 127.0.0.1 --port 8000
"""
from __future__ import annotations

from fastapi import APIRouter, FastAPI

# (pipeline, its router): e.g. ("rag", serve.rag.router) once the RAG pipeline serves queries
ROUTERS: list[tuple[str, APIRouter]] = []


def create_app(routers: list[tuple[str, APIRouter]] | None = None) -> FastAPI:
    """The app with `routers` (default ROUTERS) mounted at /<pipeline>, and GET /health."""
    app = FastAPI(title="Forgeline", summary="Every pipeline's online endpoints")

    @app.get("/health")
    def health() -> dict[str, object]:
        # what is mounted, so a deploy can check it serves the pipelines it should
        return {"status": "ok", "pipelines": [name for name, _ in mounted]}

    mounted = ROUTERS if routers is None else routers
    for name, router in mounted:
        app.include_router(router, prefix=f"/{name}", tags=[name])
    return app
