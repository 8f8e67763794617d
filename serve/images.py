"""POST /v1/images/generations: the image pipelines behind OpenAI's images API (book chapters 7-9).

The request and response are OpenAI's (`client.images.generate(...)` works unchanged):

    {"prompt": str, "model": "gan" | "vq" | "t2i" (default gan), "n": 1..MAX_N (default 1),
     "size": "<S>x<S>" (default: the model's largest), "response_format": "b64_json" (the default),
     "seed": int (optional), "user": str (ignored), and per model:
     gan: "truncation" (>= MIN_TRUNCATION; z entries beyond it redrawn, models/gan.py; default none),
     vq:  "top_p" (0, 1] (default 0.9), "temperature" (0, 2] (default 1.0),
     t2i: "guidance_scale" [0, 50] (default 3.0), "steps" 1..MAX_T2I_STEPS DDIM steps (default 25)}
    -> {"created": unix time, "data": [{"b64_json": PNG in base64, "revised_prompt": str, "seed": int}, ...],
        "model", "size", "output_format": "png", "forgeline": {"model_dir", "seed", "generate_ms", ...}}

The models:
- gan: gan_train's generator (DCGAN, face renders); unconditional. Its one size is what it was trained at
  (configs/gan_train.yaml: 32x32). Folder: FORGELINE_GAN_MODEL, else data/gan_train/<the loss with the
  lowest FID in data/gan_eval/metrics.json>, else data/gan_train/nonsaturating.
- vq: the chapter 8 serving path: generation (vq_prior's GPT continues [START] by grid x grid codes
  through models/sampling.py, top-p and temperature) -> decoding (vq_train's VQ-VAE) -> super-resolution
  (vq_upsample's 2x network). Unconditional. Sizes: the tokenizer's (32x32, no super-resolution) and twice
  it (64x64, the default: the whole path). Folders: FORGELINE_VQ_TOKENIZER (data/vq_train),
  FORGELINE_VQ_PRIOR (data/vq_prior), FORGELINE_VQ_UPSAMPLER (data/vq_upsample; read only for 2x).
- t2i: t2i_train's text-to-image diffusion model (chapter 9; models/diffusion.py's `generate`: DDIM,
  eta 0, classifier-free guidance) on the captioned scenes; its size is its training size (32x32).
  Folder: FORGELINE_T2I_MODEL, else data/t2i_train.

gan and vq do not read the prompt (it may be empty): their `revised_prompt` is "" (the prompt the image
was made from) and forgeline.conditioned is false. t2i's text encoder knows only the scene captions'
words (forgeline/scenes.py's VISUAL_WORDS): the prompt is lowercased, split into words, and the words
outside its vocabulary are dropped (`revised_prompt` is what it drew from, forgeline.dropped_words the
rest); a prompt that names no shape or colour is refused (400). Image i of a request is drawn with seed + i
(`seed` random when not given; echoed back), so a request is reproducible and image i equals image 0
of the same request with seed + i.

Errors are OpenAI's error object: 400 a bad field (n over MAX_N, a size the model does not make,
response_format "url": nothing is stored to link to, an unknown or misplaced argument), 404 an unknown
model, 413 a body over MAX_BODY, 503 a model not trained yet (naming the stage to run) or more than
MAX_QUEUED requests waiting. Models load at their first request (thread-safe); generation runs in the
thread pool, MAX_CONCURRENT at a time, so parallel requests queue instead of multiplying memory.

    curl -s 127.0.0.1:8000/v1/images/generations -H 'content-type: application/json' \\
         -d '{"model": "gan", "prompt": "", "n": 4, "seed": 7}' | jq -r '.data[0].b64_json' | base64 -d > face.png
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forgeline.checkpoint import load_model_folder
from forgeline.paths import DATA
from forgeline.scenes import COLOURS, PLURAL, SHAPES
from models import diffusion
from models.gan import GANConfig, Generator, sample_z
from models.sampling import GenerationConfig, generate
from models.text_encoder import SPECIALS
from models.upsampler import Upsampler, UpsamplerConfig
from models.vqvae import VQVAE, VQVAEConfig
from serve.page import error, json_object

MODELS = ("gan", "vq", "t2i")
DEFAULT_MODEL = "gan"
MAX_N = 8                   # images per request: 8 take ~0.5 s on vq's whole path, ~6 s on t2i (bench_images)
MAX_PROMPT_CHARS = 1000     # dall-e-2's limit
MAX_BODY = 16 * 1024        # bytes: a 1,000-character prompt and every option fit many times over
MAX_SEED = 2 ** 32 - 1
MAX_CONCURRENT = 1          # generations at a time (each uses every torch thread)
MAX_QUEUED = 16             # requests waiting for a slot; beyond: 503, try later
T2I_STEPS, T2I_GUIDANCE = 25, 3.0   # t2i_eval's DDIM steps and guidance scale (configs/t2i_eval.yaml)
MAX_T2I_STEPS = 100         # DDIM steps a request may ask for
MIN_TRUNCATION = 0.1        # below it, redrawing z entries until inside would take ever longer
DRAWABLE = {*SHAPES, *PLURAL.values(), *COLOURS}   # the words a t2i prompt must name one of
EXTRAS = {"gan": ("truncation",), "vq": ("top_p", "temperature"), "t2i": ("guidance_scale", "steps")}


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str = DEFAULT_MODEL
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None                 # None or "auto": the model's largest
    response_format: str = "b64_json"
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = None                 # OpenAI's end-user id: accepted, not used
    truncation: float | None = Field(None, ge=MIN_TRUNCATION)
    top_p: float | None = Field(None, gt=0, le=1)
    temperature: float | None = Field(None, gt=0, le=2)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    steps: int | None = Field(None, ge=1, le=MAX_T2I_STEPS)


class Unavailable(Exception):
    """A model folder is missing: 503 with the stage to run."""


def _folder(env: str, stage: str, pipeline: str, file: str = "model.safetensors", default: Path | None = None) -> Path:
    """The model folder: $env, else `default`, else data/<stage>; Unavailable (503) without its weights file."""
    folder = Path(os.environ.get(env) or default or DATA / stage)
    if not (folder / file).is_file():
        raise Unavailable(f"no {stage} model at {folder}: run the {stage} stage (`forgeline run {pipeline}`, "
                          f"or `dvc repro {stage}`)")
    return folder


def to_png(pix: torch.Tensor) -> list[str]:
    """(N, S, S, 3) uint8 -> N base64 PNGs."""
    out = []
    for p in pix.numpy():
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(p)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


# ----------------------------------------------------------------------------- the models


@dataclass
class GanModel:
    generator: Generator
    size: int
    folder: Path
    conditioned = False

    @staticmethod
    def best_loss() -> Path:
        metrics, root = DATA / "gan_eval" / "metrics.json", DATA / "gan_train"
        if metrics.is_file():   # the loss gan_eval scored best, among those trained
            losses = json.loads(metrics.read_text()).get("losses", {})
            ranked = sorted((r["fid"], loss) for loss, r in losses.items() if (root / loss).is_dir())
            if ranked:
                return root / ranked[0][1]
        return root / "nonsaturating"

    @classmethod
    def load(cls) -> GanModel:
        folder = _folder("FORGELINE_GAN_MODEL", "gan_train", "gan", "generator.safetensors", cls.best_loss())
        g = load_model_folder(folder, Generator, config_cls=GANConfig, weights="generator.safetensors")
        return cls(g, json.loads((folder / "config.json").read_text())["image_size"], folder)

    @property
    def sizes(self) -> list[int]:
        return [self.size]

    def read_prompt(self, prompt: str) -> tuple[str, dict]:
        return "", {}   # unconditional: the image is made from no prompt

    def run(self, req: ImageRequest, seeds: list[int], size: int, prompt: str) -> tuple[torch.Tensor, dict]:
        # one z per seed: image i does not depend on n (BatchNorm in eval mode: no batch statistics)
        z = torch.cat([sample_z(1, self.generator.z_dim, req.truncation, torch.Generator().manual_seed(s))
                       for s in seeds])
        return diffusion.to_uint8(self.generator(z)), {"truncation": req.truncation}


@dataclass
class VqModel:
    vqvae: VQVAE
    prior: torch.nn.Module
    start: int
    folder: Path
    conditioned = False

    @classmethod
    def load(cls) -> VqModel:
        tok = _folder("FORGELINE_VQ_TOKENIZER", "vq_train", "vq")
        prior = _folder("FORGELINE_VQ_PRIOR", "vq_prior", "vq")
        vq = load_model_folder(tok, VQVAE, config_cls=VQVAEConfig)
        gpt = load_model_folder(prior)
        start = json.loads((prior / "prior.json").read_text())["start_token"]
        if gpt.config.vocab_size != vq.config.codebook_size + 1 or gpt.config.block_size < vq.config.tokens + 1:
            raise Unavailable(f"the prior at {prior} was not trained on the tokenizer at {tok} "
                              f"(vocabulary {gpt.config.vocab_size}, codebook {vq.config.codebook_size}): rerun vq_prior")
        return cls(vq, gpt, start, prior)

    @property
    def sizes(self) -> list[int]:
        return [self.vqvae.config.image_size, 2 * self.vqvae.config.image_size]

    def read_prompt(self, prompt: str) -> tuple[str, dict]:
        return "", {}   # unconditional: the image is made from no prompt

    def run(self, req: ImageRequest, seeds: list[int], size: int, prompt: str) -> tuple[torch.Tensor, dict]:
        top_p = 0.9 if req.top_p is None else req.top_p   # vq_eval's best FID setting (README)
        temperature = 1.0 if req.temperature is None else req.temperature
        upsampler = MODELS_LOADED.get("vq_upsample") if size > self.vqvae.config.image_size else None
        t0 = time.perf_counter()
        codes = torch.tensor([generate(self.prior, [[self.start]], GenerationConfig(
            max_new_tokens=self.vqvae.config.tokens, temperature=temperature, top_p=top_p, seed=s))[0] for s in seeds])
        # a START token sampled where a code belongs (the prior never saw one there): code 0, counted
        invalid = int((codes >= self.vqvae.config.codebook_size).sum())
        codes = codes.masked_fill(codes >= self.vqvae.config.codebook_size, 0)
        t1 = time.perf_counter()
        images = self.vqvae.decode(codes)
        t2 = time.perf_counter()
        if upsampler is not None:
            images = upsampler(images)
        t3 = time.perf_counter()
        stages_ms = {"generation": round(1000 * (t1 - t0), 1), "decoding": round(1000 * (t2 - t1), 1),
                     "super_resolution": round(1000 * (t3 - t2), 1) if upsampler else None}
        return diffusion.to_uint8(images), {"top_p": top_p, "temperature": temperature, "invalid_tokens": invalid,
                                            "stages_ms": stages_ms}


def _load_upsampler() -> Upsampler:
    folder = _folder("FORGELINE_VQ_UPSAMPLER", "vq_upsample", "vq")
    return load_model_folder(folder, Upsampler, config_cls=UpsamplerConfig)


@dataclass
class T2iModel:
    model: diffusion.TextToImage
    vocab: list[str]
    folder: Path
    conditioned = True

    @classmethod
    def load(cls) -> T2iModel:
        folder = _folder("FORGELINE_T2I_MODEL", "t2i_train", "t2i")
        return cls(load_model_folder(folder, diffusion.TextToImage, config_cls=diffusion.T2IConfig),
                   json.loads((folder / "vocab.json").read_text()), folder)

    @property
    def sizes(self) -> list[int]:
        return [self.model.config.image_size]

    def read_prompt(self, prompt: str) -> tuple[str, dict]:
        """The prompt's words the text encoder knows (the scene captions' vocabulary), the rest dropped;
        a prompt that names no shape or colour (nothing the model can draw) is refused."""
        words = re.findall(r"[a-z0-9]+", prompt.lower())
        known = set(self.vocab) - set(SPECIALS)
        kept, dropped = [w for w in words if w in known], [w for w in words if w not in known]
        if not set(kept) & DRAWABLE:
            raise ValueError(f"t2i draws scenes of coloured shapes from caption words, and the prompt names no shape "
                             f"or colour (unknown words: {', '.join(dropped[:10]) or 'none'}); e.g. 'a large red "
                             f"circle on the left and a blue square on the right'")
        return " ".join(kept), {"dropped_words": dropped}

    def run(self, req: ImageRequest, seeds: list[int], size: int, prompt: str) -> tuple[torch.Tensor, dict]:
        steps = req.steps or T2I_STEPS
        guidance = T2I_GUIDANCE if req.guidance_scale is None else req.guidance_scale
        images = torch.cat([diffusion.generate(self.model, self.vocab, [prompt], steps=steps, guidance=guidance, seed=s)
                            for s in seeds])
        return images, {"steps": steps, "guidance_scale": guidance, "sampler": "ddim", "eta": 0.0}


LOADERS = {"gan": GanModel.load, "vq": VqModel.load, "vq_upsample": _load_upsampler, "t2i": T2iModel.load}


class _Loaded:
    """Each model loaded once (thread-safe) at its first request; a missing folder is retried next time."""

    def __init__(self):
        self.lock, self.models = threading.Lock(), {}

    def get(self, name: str):
        with self.lock:
            if name not in self.models:
                self.models[name] = LOADERS[name]()
            return self.models[name]

    def clear(self) -> None:
        with self.lock:
            self.models.clear()


MODELS_LOADED = _Loaded()
_slots = asyncio.Semaphore(MAX_CONCURRENT)
_pending = 0                # requests generating or waiting to
router = APIRouter()


def _bad_field(e: ValidationError) -> JSONResponse:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        return error(400, f"Unrecognized request argument supplied: {param}", param)
    got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
    return error(400, f"{param}: {err['msg']}{got}", param)


@router.post("/v1/images/generations")
async def generations(request: Request) -> JSONResponse:
    global _pending
    data = await json_object(request, MAX_BODY)
    if isinstance(data, JSONResponse):
        return data
    try:
        req = ImageRequest(**data)
    except ValidationError as e:
        return _bad_field(e)
    if req.model not in MODELS:
        return error(404, f"The model {req.model!r} does not exist: one of {', '.join(MODELS)}", "model",
                     "model_not_found")
    if req.response_format != "b64_json":
        return error(400, f"response_format {req.response_format!r} is not supported: only 'b64_json' (the service "
                          "stores no images to link to)", "response_format")
    for owner, names in EXTRAS.items():
        for name in names:
            if owner != req.model and getattr(req, name) is not None:
                return error(400, f"{name} applies to model {owner}, not {req.model}", name)
    try:
        model = await run_in_threadpool(MODELS_LOADED.get, req.model)
    except Unavailable as e:
        return error(503, str(e), "model", "model_not_trained")
    size = max(model.sizes)
    if req.size not in (None, "auto"):
        m = re.fullmatch(r"(\d+)x(\d+)", req.size)
        if not m or m[1] != m[2] or int(m[1]) not in model.sizes:
            return error(400, f"size {req.size!r} is not supported by model {req.model}: one of "
                              f"{', '.join(f'{s}x{s}' for s in model.sizes)}", "size")
        size = int(m[1])
    if req.model == "vq" and size > model.sizes[0]:
        try:
            await run_in_threadpool(MODELS_LOADED.get, "vq_upsample")
        except Unavailable as e:
            return error(503, f"{e} (or ask for size {model.sizes[0]}x{model.sizes[0]}: no super-resolution)",
                         "size", "model_not_trained")
    try:
        prompt, prompt_info = model.read_prompt(req.prompt)
    except ValueError as e:
        return error(400, str(e), "prompt")
    seed = secrets.randbelow(MAX_SEED - MAX_N) if req.seed is None else req.seed
    seeds = [seed + i for i in range(req.n)]

    def run() -> tuple[list[str], dict, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            images, info = model.run(req, seeds, size, prompt)
        return to_png(images), info, time.perf_counter() - t0

    if _pending >= MAX_CONCURRENT + MAX_QUEUED:
        return error(503, f"{MAX_QUEUED} image requests are already waiting: try again later", code="server_busy")
    _pending += 1   # one event loop: no race between the check and the count
    try:
        async with _slots:
            pngs, info, seconds = await run_in_threadpool(run)
    finally:
        _pending -= 1
    return JSONResponse({
        "created": int(time.time()), "model": req.model, "size": f"{size}x{size}", "output_format": "png",
        "data": [{"b64_json": png, "revised_prompt": prompt, "seed": s} for png, s in zip(pngs, seeds)],
        "forgeline": {"model_dir": str(model.folder), "seed": seed, "conditioned": model.conditioned,
                      "generate_ms": round(1000 * seconds, 1), **prompt_info, **info}})
