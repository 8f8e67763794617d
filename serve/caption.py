"""POST /v1/caption: the captioning pipeline's model behind one route, the book's chapter 5 system.

The request body is the image file itself (PNG, JPEG, GIF, BMP, WebP...: what Pillow reads), as
`curl --data-binary`. The route runs:

1. preprocessing: reject what is not an image (400 naming why: empty body, unreadable bytes,
   more than MAX_PIXELS pixels, read from the header before decoding, so no decompression bomb;
   413 over MAX_BYTES, checked as the body streams in), convert to RGB, resize to the model's
   square size and normalise to [-1, 1] (forgeline/images.py's `to_tensor`, what training saw);
2. the caption generator: beam search (width `beam`, 1 = greedy; models/caption.py);
3. post-processing: a word filter for what the image cannot show. The captioner only ever saw
   rendered shapes, so the only claims it can support are the visual words of its captions
   (forgeline/scenes.py's VISUAL_WORDS: shapes, colours, sizes, positions, counts and the few
   words that join them); any other word (an unknown token, or a word a future vocabulary adds
   about identity, emotion, brands or events) is dropped and returned in `dropped_words`.

    curl -s '127.0.0.1:8000/v1/caption?beam=4' -H 'content-type: image/png' --data-binary @scene.png

The model folder is FORGELINE_CAPTION_MODEL, else data/cap_train/<the best variant by held-out
CIDEr in data/cap_eval/metrics.json>, else data/cap_train/cnn; loaded at the first request
(503 until one exists).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from safetensors.torch import load_model

from forgeline.images import BadImage, decode_upload, to_tensor
from forgeline.paths import ROOT
from forgeline.scenes import filter_words
from models.caption import CaptionConfig, CaptionModel, caption

MAX_BYTES = 4 << 20          # 4 MiB: a large photo; far above any scene (~10 KB)
MAX_PIXELS = 4096 * 4096     # decoded size limit, checked before decoding
MAX_BEAM = 8
LENGTH_PENALTY = 0.6         # configs/cap_eval.yaml's, what the README figures were measured with


def model_dir() -> Path:
    if os.environ.get("FORGELINE_CAPTION_MODEL"):
        return Path(os.environ["FORGELINE_CAPTION_MODEL"])
    metrics = ROOT / "data" / "cap_eval" / "metrics.json"
    best = json.loads(metrics.read_text())["best_variant"] if metrics.is_file() else "cnn"
    return ROOT / "data" / "cap_train" / best


class CaptionResponse(BaseModel):
    caption: str              # after the word filter
    raw_caption: str          # the generator's output
    dropped_words: list[str]  # what the filter removed
    confidence: float         # mean log-probability per generated token (EOS included)
    beam: int
    image_size: list[int]     # the upload's width and height
    model: str                # the model folder's name (the encoder variant)


class _Model:
    """The model and vocabulary, loaded once (thread-safe) at the first request."""

    def __init__(self):
        self.lock, self.loaded = threading.Lock(), None

    def get(self) -> tuple[CaptionModel, list[str], str]:
        with self.lock:
            if self.loaded is None:
                path = model_dir()
                if not (path / "model.safetensors").is_file():
                    raise HTTPException(503, f"no caption model at {path}: run `forgeline run caption`")
                model = CaptionModel(CaptionConfig(**json.loads((path / "config.json").read_text())))
                load_model(model, str(path / "model.safetensors"))
                self.loaded = model.eval(), json.loads((path / "vocab.json").read_text()), path.name
            return self.loaded


MODEL = _Model()
router = APIRouter()


@router.post("/v1/caption", response_model=CaptionResponse)
async def caption_image(request: Request, beam: int = Query(4, description=f"beam width, 1 (greedy) to {MAX_BEAM}")
                        ) -> CaptionResponse:
    if not 1 <= beam <= MAX_BEAM:
        raise HTTPException(400, f"beam={beam}: must be 1 to {MAX_BEAM}")
    if int(request.headers.get("content-length") or 0) > MAX_BYTES:
        raise HTTPException(413, f"over {MAX_BYTES:,} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BYTES:
            raise HTTPException(413, f"over {MAX_BYTES:,} bytes")
    try:
        rgb = decode_upload(bytes(body), MAX_BYTES, MAX_PIXELS)
    except BadImage as e:
        raise HTTPException(400, str(e)) from None
    model, words, name = await run_in_threadpool(MODEL.get)

    def run() -> tuple[list[str], list[float]]:
        with torch.inference_mode():
            return caption(model, words, to_tensor(rgb[None], model.config.image_size), beam, LENGTH_PENALTY)

    (raw,), (conf,) = await run_in_threadpool(run)
    kept, dropped = filter_words(raw)
    return CaptionResponse(caption=kept, raw_caption=raw, dropped_words=dropped, confidence=round(conf, 4), beam=beam,
                           image_size=[rgb.shape[1], rgb.shape[0]], model=name)
