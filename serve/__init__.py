"""The online side of every pipeline: one FastAPI app (serve/app.py) that mounts each pipeline's routes."""
