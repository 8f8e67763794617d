"""The VQ-VAE pipeline: the model's shapes, each loss on a tiny batch, the straight-through gradient,
dead-code restarts, code statistics, top-p changing what the prior samples, vq_train's gate and
bit-for-bit resume, and one run of the whole pipeline on a tiny configuration (slow)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from forgeline.config import load_config
from models.gpt import GPT, GPTConfig
from models.vqvae import (VQVAE, PatchDiscriminator, VQVAEConfig, code_stats, generator_adv_loss, hinge_d_loss,
                          perceptual_loss)
from tests.conftest import cli_overrides, run_in, stage_lines

TINY_DATA = ["train_scenes=60", "val_scenes=10", "test_scenes=20", "fashion_train=300", "fashion_val=50",
             "fashion_test=100"]
SMALL = VQVAEConfig(image_size=16, hidden=16, n_down=2, codebook_size=8, code_dim=4)


def images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("normalize", [True, False])
def test_shapes_encode_decode_and_the_discriminator(normalize):
    torch.manual_seed(0)
    c = VQVAEConfig(image_size=32, hidden=16, n_down=2, codebook_size=16, code_dim=8, normalize=normalize)
    model = VQVAE(c).eval()
    x = images(5, 32)
    rec, idx, losses = model(x)
    assert rec.shape == x.shape and idx.shape == (5, 8, 8) and c.tokens == 64
    assert rec.abs().max() <= 1 and idx.min() >= 0 and idx.max() < 16
    assert set(losses) == {"codebook", "commit"} and all(v.ndim == 0 for v in losses.values())
    assert torch.equal(model.encode(x), idx)                       # encode = the forward's tokens
    assert torch.allclose(model.decode(idx), rec, atol=1e-5)       # decode(tokens) = the reconstruction
    assert torch.allclose(model.decode(idx.flatten(1)), rec, atol=1e-5)  # raster order reads back alike
    assert PatchDiscriminator(8)(x).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        VQVAEConfig(image_size=30, n_down=2)


def test_each_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    model = VQVAE(SMALL)
    x = images()
    rec, _, losses = model(x)
    assert losses["codebook"] > 0 and math.isclose(losses["commit"].item(), SMALL.beta * losses["codebook"].item(),
                                                   rel_tol=1e-5)  # same distance, commitment weighted by beta
    # the codebook loss moves only the codebook, the commitment loss only the encoder
    losses["codebook"].backward(retain_graph=True)
    assert model.quantizer.codebook.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder.parameters())
    model.zero_grad()
    losses["commit"].backward(retain_graph=True)
    assert model.quantizer.codebook.weight.grad is None or model.quantizer.codebook.weight.grad.abs().sum() == 0
    assert all(p.grad.abs().sum() > 0 for p in model.encoder.parameters() if p.dim() > 1)

    trunk = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()),
                                torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.MaxPool2d(2)))
    trunk.requires_grad_(False)
    assert perceptual_loss(trunk, x, x).item() == 0
    y = x.clone().requires_grad_(True)
    far = perceptual_loss(trunk, y, -x)
    near = perceptual_loss(trunk, x + 0.05 * images(seed=1), x)
    assert far > near > 0
    far.backward()
    assert y.grad.abs().sum() > 0                                   # it trains the decoder through its input

    assert hinge_d_loss(torch.full((4, 1), 2.0), torch.full((4, 1), -2.0)).item() == 0  # both beyond the margin
    assert hinge_d_loss(torch.zeros(4, 1), torch.zeros(4, 1)).item() == 2
    assert generator_adv_loss(torch.full((4, 1), 3.0)).item() == -3


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = VQVAE(SMALL)
    x = images()
    rec, _, _ = model(x)
    F.mse_loss(rec, x).backward()                 # the reconstruction alone: no codebook or commitment term
    enc = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in enc)
    # without the estimator the lookup cuts the graph: an argmin has no gradient
    z_e = model.encoder(x)
    flat = F.normalize(z_e.permute(0, 2, 3, 1).reshape(-1, SMALL.code_dim), dim=1)
    hard = model.quantizer.entries(model.quantizer.nearest(flat))
    assert torch.autograd.grad(hard.sum(), z_e, allow_unused=True)[0] is None


def test_dead_codes_restart_on_encoder_outputs_and_stats():
    torch.manual_seed(0)
    model = VQVAE(SMALL).train()
    x = images(8)
    for _ in range(3):
        model(x)
    q = model.quantizer
    assert math.isclose(q.usage.sum().item(), 1.0, rel_tol=1e-4)
    q.usage[:3] = 0                                                # codes 0-2 unused for long
    before = q.codebook.weight.detach().clone()
    z_e = model.encoder(x).detach()
    n = q.restart_dead(z_e, threshold=0.03, gen=torch.Generator().manual_seed(0))
    assert n >= 3
    moved = (q.codebook.weight - before).abs().sum(1) > 0
    assert moved[:3].all() and int(moved.sum()) == n
    flat = F.normalize(z_e.permute(0, 2, 3, 1).reshape(-1, SMALL.code_dim), dim=1)
    dist = torch.cdist(q.codebook.weight[:3].detach(), flat).min(1).values
    assert (dist < 0.01).all()                                     # each sits on an encoder output
    assert torch.allclose(q.usage[:3], torch.full((3,), 1 / 8))
    assert q.restart_dead(z_e, threshold=0.0) == 0

    assert code_stats(torch.arange(8).repeat(5), 8) == {"usage": 1.0, "perplexity": pytest.approx(8.0)}
    assert code_stats(torch.zeros(20, dtype=torch.long), 8) == {"usage": 0.125, "perplexity": pytest.approx(1.0)}


def test_upsampler_doubles_the_size_and_starts_near_bilinear():
    from models.upsampler import Upsampler, UpsamplerConfig

    torch.manual_seed(0)
    model = Upsampler(UpsamplerConfig(width=8, layers=2))
    x = images(3, 16) * 0.5
    y = model(x)
    assert y.shape == (3, 3, 32, 32) and y.abs().max() <= 1
    with torch.no_grad():
        model.net[-2].weight.zero_()
        model.net[-2].bias.zero_()
    assert torch.allclose(model(x), F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
    assert model(images(1, 32)).shape == (1, 3, 64, 64)   # fully convolutional: 32 -> 64 as vq_eval uses it


def test_top_p_changes_what_the_prior_samples():
    from tasks.vq_eval import sample_codes

    torch.manual_seed(0)
    prior = GPT(GPTConfig(vocab_size=17, block_size=17, n_layer=1, n_head=2, n_embd=16, pos_encoding="learned")).eval()
    with torch.no_grad():
        prior.lm_head.weight.mul_(20)              # peaked next-token distributions, as a trained prior's
    full = sample_codes(prior, 16, 40, 16, temperature=1.0, top_p=1.0, seed=3, batch_size=40)
    nucleus = sample_codes(prior, 16, 40, 16, temperature=1.0, top_p=0.5, seed=3, batch_size=40)
    greedy = sample_codes(prior, 16, 1, 16, temperature=1e-6, top_p=1.0, seed=3, batch_size=1)
    assert full.shape == nucleus.shape == (40, 16)
    assert not torch.equal(full, nucleus)
    # a small nucleus narrows the samples toward the most likely continuation
    assert len({tuple(r) for r in nucleus.tolist()}) < len({tuple(r) for r in full.tolist()})
    assert (nucleus == greedy).float().mean() > (full == greedy).float().mean()
    tiny_p = sample_codes(prior, 16, 5, 16, temperature=1.0, top_p=1e-6, seed=3, batch_size=5)
    assert (tiny_p == greedy).all()                # top-p -> 0 is greedy decoding


# ----------------------------------------------------------------------------- training and resume


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """img_data, img_validate and img_eval_net on a tiny configuration."""
    from tasks.img_data import ImgDataConfig, img_data
    from tasks.img_eval_net import ImgEvalNetConfig, img_eval_net
    from tasks.img_validate import ImgValidateConfig, img_validate

    root = tmp_path_factory.mktemp("vq")
    img_data(load_config(ImgDataConfig, "img_data", [f"out_dir={root}/img_data", *TINY_DATA]))
    manifest = root / "img_data" / "manifest.parquet"
    validation = root / "img_validate" / "result.json"
    img_validate(load_config(ImgValidateConfig, "img_validate",
                             [f"manifest={manifest}", f"out_dir={root}/img_validate", "min_images=50"]))
    img_eval_net(ImgEvalNetConfig(manifest=str(manifest), validation=str(validation), out_dir=str(root / "net"),
                                  ckpt_dir=str(root / "net_ckpt"), width=8, batch_size=16, fashion_steps=3,
                                  scene_steps=3, ckpt_interval=2, log_interval=2, floor_images=40,
                                  instrument_scenes=30))
    return {"root": root, "manifest": manifest, "validation": validation, "net": root / "net"}


def vq_cfg(tiny, tmp_path, **kw):
    from tasks.vq_train import VqTrainConfig

    settings = dict(manifest=str(tiny["manifest"]), validation=str(tiny["validation"]), eval_net=str(tiny["net"]),
                    out_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "ckpt"), hidden=16, codebook_size=16,
                    code_dim=8, disc_width=8, batch_size=8, max_steps=6, adv_start=2, restart_interval=2,
                    ckpt_interval=3, log_interval=3, warmup_steps=1, eval_images=20)
    return VqTrainConfig(**{**settings, **kw})


def test_vq_train_refuses_an_unvalidated_manifest_and_resumes_bit_for_bit(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    from tasks.vq_train import GateClosed, vq_train

    with pytest.raises(GateClosed, match="no validation report"):
        vq_train(vq_cfg(tiny, tmp_path, validation=str(tmp_path / "missing.json")))
    cfg = vq_cfg(tiny, tmp_path)
    first = vq_train(cfg)
    assert {"mse", "psnr", "usage", "perplexity"} <= set(first["test"]) and first["test"]["images"] == 20
    history = json.loads((tmp_path / "out" / "history.json").read_text())["train"]
    assert "adv" not in history[1][1] and "adv" in history[2][1] and "d_loss" in history[2][1]  # after the warm-up
    weights = load_file(tmp_path / "out" / "model.safetensors")
    (root,) = (tmp_path / "ckpt").iterdir()
    shutil.rmtree(root / "step_00000006")          # killed between the step-3 checkpoint and the end
    shutil.rmtree(tmp_path / "out")
    capsys.readouterr()
    second = vq_train(cfg)
    assert "step_00000003 at step 3" in capsys.readouterr().out
    again = load_file(tmp_path / "out" / "model.safetensors")
    assert second["test"]["mse"] == first["test"]["mse"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)


# ----------------------------------------------------------------------------- the whole pipeline

TINY = {
    "img_data": dict(a.split("=") for a in TINY_DATA),
    "img_validate": {"min_images": 50},
    "img_eval_net": {"fashion_steps": 3, "scene_steps": 3, "batch_size": 16, "ckpt_interval": 2, "log_interval": 2,
                     "floor_images": 40, "width": 8, "instrument_scenes": 30},
    "vq_train": {"hidden": 16, "codebook_size": 16, "code_dim": 8, "disc_width": 8, "batch_size": 8, "max_steps": 4,
                 "adv_start": 2, "restart_interval": 2, "ckpt_interval": 2, "log_interval": 2, "warmup_steps": 1,
                 "eval_images": 20},
    "vq_upsample": {"width": 8, "layers": 1, "batch_size": 8, "max_steps": 3, "ckpt_interval": 2, "log_interval": 2,
                    "eval_images": 20},
    "vq_prior": {"train_images": 100, "test_images": 20, "n_layer": 1, "n_embd": 32, "n_head": 2, "batch_size": 8,
                 "max_steps": 4, "warmup_steps": 1, "ckpt_interval": 2, "log_interval": 2},
    "vq_eval": {"real_images": 40, "samples": 20, "temperatures": "[1.0]", "top_ps": "[1.0,0.5]", "batch_size": 20,
                "grid": 2},
}
STAGES = ["img_data", "img_validate", "img_eval_net", "vq_train", "vq_upsample", "vq_prior", "vq_eval"]


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_tiny_config(workspace):
    ws = workspace
    out = run_in(ws, "-m", "flows.vq", "--no-push", *cli_overrides(TINY))
    assert stage_lines(out.stdout, STAGES) == {s: "ran" for s in STAGES}, out.stdout[-3000:]
    prior = json.loads((ws / "data" / "vq_prior" / "metrics.json").read_text())
    assert 0 < prior["test_bits_per_token"] and prior["test_bits_per_dim"] == pytest.approx(
        prior["test_bits_per_token"] * 64 / (3 * 32 * 32))
    metrics = json.loads((ws / "data" / "vq_eval" / "metrics.json").read_text())
    rows = metrics["rows"]
    assert [r.get("top_p") for r in rows] == [None, 1.0, 0.5]
    assert all(r["fid"] >= 0 and r["fid_floor"] > 0 and r["fake_images"] == (40 if i == 0 else 20)
               for i, r in enumerate(rows))
    assert set(metrics["vq_upsample"]["test_psnr"]) == {"upsampler", "bilinear", "bicubic"}
    for name in ("real.png", "reconstructions.png", "samples_t1_p1.png", "samples_t1_p0.5.png", "samples_t1_p1_x2.png"):
        assert (ws / "data" / "vq_eval" / name).stat().st_size > 100
    assert "| prior samples, temperature 1, top-p 0.5 |" in (ws / "data" / "vq_eval" / "report.md").read_text()
    again = run_in(ws, "-m", "flows.vq", "--no-push", *cli_overrides(TINY))
    assert stage_lines(again.stdout, STAGES) == {s: "skipped" for s in STAGES}, again.stdout[-3000:]
