"""POST /v1/images/generations (serve/images.py) with tiny model folders made here in the stages' own
formats: a GAN generator trained for a few steps by gan_train's own loop (tasks/gan_train.py's
`train_loss`, which writes the folder), and an untrained VQ-VAE, GPT prior (vq_prior's model config)
and 2x upsampler saved as vq_train, vq_prior and vq_upsample save them. In process (TestClient) for
the request rules; the official `openai` client against a live uvicorn on 127.0.0.1 for the wire.
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_model

from forgeline.paths import ROOT
from forgeline.scenes import VISUAL_WORDS
from models.diffusion import TextToImage
from models.gpt import GPT
from models.text_encoder import build_vocab
from models.upsampler import Upsampler, UpsamplerConfig
from models.vqvae import VQVAE, VQVAEConfig
from serve import images
from serve.app import create_app
from tests.test_serve_llm import free_port, stop_server

URL = "/v1/images/generations"


def tiny_gan(root: Path, steps: int = 3) -> Path:
    """gan_train's folder (generator.safetensors + config.json), written by its own train_loss, 32x32."""
    from tasks.gan_train import GanTrainConfig, train_loss

    data = root / "gan_data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "manifest.parquet").write_bytes(b"tiny")   # only hashed into the checkpoint key here
    cfg = GanTrainConfig(data_dir=str(data), out_dir=str(root / "gan_train"), ckpt_dir=str(root / "ckpt"),
                         losses=["nonsaturating"], z_dim=8, g_width=4, d_width=4, batch_size=8, steps=steps,
                         log_interval=100, ckpt_interval=100)
    faces = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train_loss(cfg, "nonsaturating", faces)
    return root / "gan_train" / "nonsaturating"


def tiny_vq(root: Path) -> dict[str, Path]:
    """vq_train's, vq_prior's and vq_upsample's folders, untrained: 16x16 images, a 4x4 grid of 16 codes."""
    from tasks.vq_prior import VqPriorConfig

    torch.manual_seed(0)
    vq_cfg = VQVAEConfig(image_size=16, hidden=8, n_down=2, n_res=1, codebook_size=16, code_dim=4)
    prior_cfg = VqPriorConfig(n_layer=1, n_embd=16, n_head=2).model_config(vq_cfg)
    folders = {"tokenizer": root / "vq_train", "prior": root / "vq_prior", "upsampler": root / "vq_upsample"}
    for (key, model), config in zip([("tokenizer", VQVAE(vq_cfg)), ("prior", GPT(prior_cfg)),
                                     ("upsampler", Upsampler(UpsamplerConfig(width=8, layers=1)))],
                                    [vq_cfg, prior_cfg, UpsamplerConfig(width=8, layers=1)]):
        folders[key].mkdir(parents=True, exist_ok=True)
        save_model(model, str(folders[key] / "model.safetensors"))
        (folders[key] / "config.json").write_text(json.dumps(asdict(config), indent=2))
    (folders["prior"] / "prior.json").write_text(json.dumps(
        {"start_token": vq_cfg.codebook_size, "grid": vq_cfg.grid, "order": "raster", "vqvae": str(folders["tokenizer"]),
         "domain": "fashion"}))
    return folders


def tiny_t2i(root: Path) -> Path:
    """t2i_train's folder (model.safetensors + config.json + vocab.json), untrained (weights jittered, so the
    text reaches the output): 16x16, 50 timesteps."""
    from tasks.t2i_train import T2iTrainConfig

    torch.manual_seed(0)
    vocab = build_vocab(VISUAL_WORDS)
    cfg = T2iTrainConfig(image_size=16, timesteps=50, text_dim=16, text_layers=1, text_heads=2, base=8, mults=[1, 2],
                         attn_levels=[1]).model_config(len(vocab))
    out = root / "t2i_train"
    out.mkdir(parents=True, exist_ok=True)
    model = TextToImage(cfg)
    with torch.no_grad():   # the U-Net's zero-initialised output layers would make the text irrelevant
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (out / "vocab.json").write_text(json.dumps(vocab))
    return out


def model_env(gan: Path, vq: dict[str, Path], t2i: Path) -> dict[str, str]:
    return {"FORGELINE_GAN_MODEL": str(gan), "FORGELINE_VQ_TOKENIZER": str(vq["tokenizer"]),
            "FORGELINE_VQ_PRIOR": str(vq["prior"]), "FORGELINE_VQ_UPSAMPLER": str(vq["upsampler"]),
            "FORGELINE_T2I_MODEL": str(t2i)}


def decode(item: dict) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {"root": root, "gan": tiny_gan(root), "vq": tiny_vq(root), "t2i": tiny_t2i(root)}


@pytest.fixture
def client(folders, monkeypatch):
    for k, v in model_env(folders["gan"], folders["vq"], folders["t2i"]).items():
        monkeypatch.setenv(k, v)
    images.MODELS_LOADED.clear()
    yield TestClient(create_app([("images", images.router)]))
    images.MODELS_LOADED.clear()


def post(client, **body):
    return client.post(URL, json={"prompt": "", **body})


def test_gan_images_shape_n_seed(client, folders):
    r = post(client, prompt="a smiling face", model="gan", n=3, size="32x32", seed=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "gan" and body["size"] == "32x32" and abs(body["created"] - time.time()) < 60
    assert [d["seed"] for d in body["data"]] == [5, 6, 7]
    assert all(d["revised_prompt"] == "" for d in body["data"])   # unconditional: the prompt is not used
    assert body["forgeline"]["conditioned"] is False and body["forgeline"]["model_dir"] == str(folders["gan"])
    pix = [decode(d) for d in body["data"]]
    assert all(p.shape == (32, 32, 3) for p in pix)
    assert not np.array_equal(pix[0], pix[1])
    # the same seed, the same images; image i is image 0 of seed + i; the default size is the model's
    again = post(client, model="gan", n=3, seed=5).json()
    assert [d["b64_json"] for d in again["data"]] == [d["b64_json"] for d in body["data"]]
    one = post(client, model="gan", seed=6).json()
    assert len(one["data"]) == 1 and one["data"][0]["b64_json"] == body["data"][1]["b64_json"]
    # no seed: a random one, echoed back, that reproduces the images
    free = post(client, model="gan", n=2).json()
    assert post(client, model="gan", n=2, seed=free["forgeline"]["seed"]).json()["data"] == free["data"]
    # truncation draws other z: other images
    cut = post(client, model="gan", n=3, seed=5, truncation=0.2).json()
    assert cut["forgeline"]["truncation"] == 0.2
    assert all(a["b64_json"] != b["b64_json"] for a, b in zip(cut["data"], body["data"]))


def test_vq_path_sizes_and_sampling(client):
    full = post(client, model="vq", n=2, seed=1)   # default: the whole path, 2x super-resolution
    assert full.status_code == 200, full.text
    body = full.json()
    assert body["size"] == "32x32" and [decode(d).shape for d in body["data"]] == [(32, 32, 3)] * 2
    stages = body["forgeline"]["stages_ms"]
    assert stages["generation"] > 0 and stages["decoding"] > 0 and stages["super_resolution"] is not None
    assert body["forgeline"]["top_p"] == 0.9 and body["forgeline"]["temperature"] == 1.0
    small = post(client, model="vq", n=2, seed=1, size="16x16").json()
    assert [decode(d).shape for d in small["data"]] == [(16, 16, 3)] * 2
    assert small["forgeline"]["stages_ms"]["super_resolution"] is None
    assert post(client, model="vq", n=2, seed=1, size="16x16").json()["data"] == small["data"]
    # top-p and temperature change what is sampled (same seed)
    other = post(client, model="vq", n=2, seed=1, size="16x16", top_p=0.3, temperature=0.5).json()
    assert other["data"] != small["data"]


def test_t2i_reads_the_caption_words(client):
    r = post(client, model="t2i", prompt="A large RED circle, on the left! with sparkles", n=2, seed=3, steps=4)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["revised_prompt"] for d in body["data"]] == ["a large red circle on the left with"] * 2
    assert body["forgeline"]["dropped_words"] == ["sparkles"] and body["forgeline"]["conditioned"] is True
    assert body["size"] == "16x16" and [decode(d).shape for d in body["data"]] == [(16, 16, 3)] * 2
    assert body["forgeline"]["steps"] == 4 and body["forgeline"]["guidance_scale"] == 3.0
    again = post(client, model="t2i", prompt="a large red circle on the left with", seed=4, steps=4).json()
    assert again["data"][0]["b64_json"] == body["data"][1]["b64_json"]   # image i: seed + i
    # the prompt, the guidance scale and the steps each change the image
    first = body["data"][0]["b64_json"]
    for change in ({"prompt": "three blue squares"}, {"guidance_scale": 0.0}, {"steps": 2}):
        other = post(client, **{"model": "t2i", "prompt": "a large red circle on the left", "seed": 3, "steps": 4,
                                **change}).json()
        assert other["data"][0]["b64_json"] != first, change
    # nothing it can draw: refused, saying why
    for prompt in ("a cat on a sofa", "", "on the left"):
        r = post(client, model="t2i", prompt=prompt)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "names no shape or colour" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, status, param, says", [
    ({"model": "gan", "n": images.MAX_N + 1}, 400, "n", f"less than or equal to {images.MAX_N}"),
    ({"model": "gan", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"model": "gan", "n": True}, 400, "n", "valid integer"),
    ({"model": "gan", "size": "64x64"}, 400, "size", "one of 32x32"),
    ({"model": "gan", "size": "1024x1024"}, 400, "size", "one of 32x32"),
    ({"model": "vq", "size": "32x16"}, 400, "size", "one of 16x16, 32x32"),
    ({"model": "dall-e-3"}, 404, "model", "gan, vq, t2i"),
    ({"model": "gan", "response_format": "url"}, 400, "response_format", "only 'b64_json'"),
    ({"model": "gan", "quality": "hd"}, 400, "quality", "Unrecognized request argument"),
    ({"model": "vq", "truncation": 0.5}, 400, "truncation", "applies to model gan"),
    ({"model": "gan", "truncation": 0.001}, 400, "truncation", "greater than or equal to 0.1"),
    ({"model": "gan", "top_p": 0.5}, 400, "top_p", "applies to model vq"),
    ({"model": "vq", "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"model": "gan", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"model": "gan", "guidance_scale": 3}, 400, "guidance_scale", "applies to model t2i"),
    ({"model": "t2i", "steps": images.MAX_T2I_STEPS + 1}, 400, "steps", "less than or equal to"),
    ({"model": "t2i", "size": "64x64"}, 400, "size", "one of 16x16"),
    ({"model": "gan", "prompt": "x" * (images.MAX_PROMPT_CHARS + 1)}, 400, "prompt", "at most 1000 characters"),
])
def test_caps_and_bad_requests(client, body, status, param, says):
    r = post(client, **body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"] and err["type"] == "invalid_request_error", err


def test_malformed_bodies(client):
    assert client.post(URL, content=b"{not json").status_code == 400
    assert client.post(URL, json=["prompt"]).status_code == 400
    missing = client.post(URL, json={"model": "gan"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    big = client.post(URL, content=b" " * (images.MAX_BODY + 1))
    assert big.status_code == 413


def test_busy_and_untrained(client, folders, monkeypatch):
    monkeypatch.setattr(images, "_pending", images.MAX_CONCURRENT + images.MAX_QUEUED)
    r = post(client, model="gan")
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
    monkeypatch.setattr(images, "_pending", 0)

    empty = folders["root"] / "empty"
    monkeypatch.setenv("FORGELINE_GAN_MODEL", str(empty))
    monkeypatch.setenv("FORGELINE_VQ_UPSAMPLER", str(empty))
    monkeypatch.setenv("FORGELINE_T2I_MODEL", str(empty))
    images.MODELS_LOADED.clear()
    r = post(client, model="gan")
    assert r.status_code == 503 and "gan_train" in r.json()["error"]["message"], r.text
    # vq without its upsampler: the tokenizer's size still works, 2x names the stage to run
    r = post(client, model="vq", size="32x32")
    assert r.status_code == 503 and "vq_upsample" in r.json()["error"]["message"], r.text
    assert post(client, model="vq", size="16x16").status_code == 200
    r = post(client, model="t2i", prompt="a red circle")
    assert r.status_code == 503 and "t2i_train" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["type"] == "server_error"
    # trained meanwhile: served without a restart
    monkeypatch.setenv("FORGELINE_GAN_MODEL", str(folders["gan"]))
    assert post(client, model="gan").status_code == 200


def start_app(env_extra: dict[str, str], tmp: Path) -> tuple[subprocess.Popen, str]:
    """The whole app under uvicorn on 127.0.0.1 with `env_extra`, once /health answers."""
    port = free_port()
    log = open(tmp / "server.log", "w")   # a file, not a pipe nobody reads
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "serve.app:create_app", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "NO_PROXY": "127.0.0.1", "OMP_NUM_THREADS": "1", **env_extra})
    proc.log_path, url = tmp / "server.log", f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.log_path.read_text()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10):
                return proc, url
        except OSError:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def live(folders, tmp_path_factory):
    proc, url = start_app(model_env(folders["gan"], folders["vq"], folders["t2i"]), tmp_path_factory.mktemp("live"))
    yield url
    out = stop_server(proc)   # by its PID
    assert "Traceback" not in out, out


def test_openai_client_generates(live):
    import openai

    client = openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0)
    res = client.images.generate(model="gan", prompt="a face with glasses", n=2, size="32x32",
                                 response_format="b64_json", extra_body={"seed": 11})
    assert res.created > 0 and len(res.data) == 2
    pix = [decode({"b64_json": d.b64_json}) for d in res.data]
    assert [p.shape for p in pix] == [(32, 32, 3)] * 2 and res.data[0].revised_prompt == ""
    vq = client.images.generate(model="vq", prompt="", n=1, extra_body={"seed": 2, "top_p": 0.8})
    assert decode({"b64_json": vq.data[0].b64_json}).shape == (32, 32, 3)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="gan", prompt="", n=images.MAX_N + 1)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="gan", prompt="", response_format="url")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-2", prompt="a cat")
    t2i = client.images.generate(model="t2i", prompt="two small green triangles", n=1,
                                 extra_body={"seed": 0, "steps": 3, "guidance_scale": 2.0})
    assert t2i.data[0].revised_prompt == "two small green triangles"
    assert decode({"b64_json": t2i.data[0].b64_json}).shape == (16, 16, 3)


def test_parallel_requests_queue(live):
    """Requests at once: each answered, each the same images as alone (the semaphore serialises them)."""
    def ask(seed: int) -> dict:
        req = urllib.request.Request(f"{live}{URL}", json.dumps({"prompt": "", "model": "vq", "n": 4, "seed": seed}).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, ask(s))) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(6))
    assert ask(3)["data"] == results[3]["data"]
