"""Text-to-image diffusion (models/text_encoder.py, unet.py, diffusion.py; tasks/t2i_train.py, t2i_eval.py):
shapes, the schedules, the DDPM loss on a tiny batch, DDIM determinism, guidance, the attribute judge,
and one run of the whole pipeline on a tiny configuration (slow)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from forgeline import scenes
from forgeline.image_metrics import attribute_accuracy, attribute_hits
from models.diffusion import T2IConfig, TextToImage, generate, make_betas, null_ids, sample
from models.eval_net import EvalNet, EvalNetConfig
from models.text_encoder import BOS, PAD, TextEncoder, TextEncoderConfig, build_vocab, encode_captions
from models.unet import UNet, UNetConfig
from tasks.t2i_eval import scene_labels
from tests.conftest import cli_overrides, run_in, stage_lines

VOCAB = build_vocab(scenes.VISUAL_WORDS)
TINY_MODEL = dict(text={"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32},
                  unet={"base": 8, "mults": [1, 2], "attn_levels": [1], "heads": 2, "groups": 4})


def tiny(timesteps: int = 50, schedule: str = "cosine", image_size: int = 8) -> TextToImage:
    torch.manual_seed(0)
    return TextToImage(T2IConfig(vocab_size=len(VOCAB), image_size=image_size, timesteps=timesteps, schedule=schedule,
                                 **TINY_MODEL))


def randomized(model: TextToImage) -> TextToImage:
    """The zero-initialised output layers given small random weights: an untrained model whose output
    depends on its inputs (the caption included), as a trained one's does."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    return model


def test_text_encoder_states_mask_and_the_empty_caption():
    ids = encode_captions(["a red circle on the left", "", "a zebra"], VOCAB, max_len=32)
    assert ids.shape == (3, 7) and (ids[:, 0] == BOS).all()
    assert (ids[1, 1:] == PAD).all() and ids[2, 2] == 1             # <unk> for a word outside the vocabulary
    assert torch.equal(null_ids(3, 7)[0], ids[1])                   # the empty caption is <bos> alone
    enc = TextEncoder(TextEncoderConfig(vocab_size=len(VOCAB), d_model=32, n_heads=4, n_layers=2, d_ff=64)).eval()
    states, mask = enc(ids)
    assert states.shape == (3, 7, 32) and torch.equal(mask, ids != PAD)
    assert torch.isfinite(states).all()
    # padding changes nothing for the real tokens
    alone, _ = enc(ids[2:, :3])
    assert torch.allclose(alone[0], states[2, :3], atol=1e-5)
    assert len(encode_captions(["a " * 100], VOCAB, max_len=32)[0]) == 32


def test_unet_keeps_the_image_shape_and_reads_the_text():
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=16, base=8, mults=(1, 2, 2), attn_levels=(1, 2), heads=2, groups=4, text_dim=16))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = net(x, t, text, mask)
    assert out.shape == x.shape and not out.abs().sum()              # zero-initialised output layer
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    out = net(x, t, text, mask)
    assert out.abs().sum() > 0
    other = text.clone()
    other[0, 3:] = 5.0                                             # under the mask: ignored
    assert torch.allclose(net(x, t, other, mask)[0], out[0], atol=1e-5)
    other[0, 0] = 5.0                                              # a real token: read
    assert not torch.allclose(net(x, t, other, mask)[0], out[0], atol=1e-3)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_properties(schedule):
    betas = make_betas(schedule, 1000)
    abar = torch.cumprod(1 - betas, 0)
    assert betas.shape == (1000,) and (betas > 0).all() and (betas <= 0.999).all()
    assert (abar[1:] < abar[:-1]).all()                            # signal only ever falls
    assert abar[0] > 0.999 and abar[-1] < 1e-4                      # starts at the data, ends at noise
    if schedule == "linear":
        assert torch.allclose(betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    else:   # cosine: abar(T/2) = cos^2(pi/4 (1 + s/0.5)/(1 + s)) ~ 0.49
        assert abar[499].item() == pytest.approx(0.49, abs=0.02)
    model = tiny(timesteps=1000, schedule=schedule)
    x0, noise = torch.ones(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    assert torch.allclose(model.q_sample(x0, torch.tensor([999]), noise), abar[-1].sqrt().float() * x0, atol=1e-6)
    with pytest.raises(ValueError, match="cosine or linear"):
        make_betas("sigmoid", 10)


def test_ddpm_loss_falls_on_a_tiny_batch():
    model = tiny()
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1
    ids = encode_captions(["a red circle on the left"] * 4 + ["a large blue square"] * 4, VOCAB, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        # the same timesteps and noise every step: the loss of one fixed problem
        loss = model.loss(x0, ids, p_uncond=0.0, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.0, abs=0.3)                 # zero output at init: MSE of unit noise
    assert losses[-1] < 0.8 * losses[0]


def test_min_snr_weighting_damps_the_low_noise_timesteps():
    model = randomized(tiny(timesteps=1000))
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    ids = encode_captions(["a red circle on the left"] * 16, VOCAB, 32)

    def loss(gamma: float) -> float:
        with torch.no_grad():     # the same timesteps, noise and drops for every gamma
            return model.loss(x0, ids, p_uncond=0.0, generator=torch.Generator().manual_seed(3),
                              min_snr_gamma=gamma).item()

    snr = model.abar / (1 - model.abar)
    plain = loss(0.0)
    assert loss(float(snr.max()) + 1) == pytest.approx(plain, rel=1e-5)   # gamma above every SNR: no weight < 1
    assert loss(5.0) < plain                                               # the low-noise steps count less
    assert loss(1.0) < loss(5.0)
    # per timestep: the weight is min(SNR, gamma) / SNR, 1 at the noisy end
    t = torch.tensor([0, 500, 999])
    w = snr[t].clamp(max=5.0) / snr[t]
    assert w[0] < 0.01 and w[2] == 1.0


def test_ddim_eta0_is_deterministic_and_eta_adds_noise():
    model = randomized(tiny())
    ids = encode_captions(["a red circle", "two objects a blue square and a green triangle"], VOCAB, 32)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(eta: float, seed: int) -> torch.Tensor:
        return sample(model, ids, steps=10, guidance=1.0, eta=eta, generator=torch.Generator().manual_seed(seed),
                      noise=x_T)

    assert torch.equal(run(0.0, 0), run(0.0, 99))                   # eta 0: x_T alone decides
    assert not torch.allclose(run(1.0, 0), run(1.0, 99))           # eta 1: fresh noise at every step
    assert torch.equal(run(1.0, 5), run(1.0, 5))                   # seeded
    out = run(0.0, 0)
    assert out.shape == (2, 3, 8, 8) and out.abs().max() <= 1.0 + 1e-5


def test_guidance_scale_changes_the_sample_and_generate_is_seeded():
    model = randomized(tiny())
    prompts = ["a large red circle on the left", "a small blue square on the right"]
    by_scale = {g: generate(model, VOCAB, prompts, steps=5, guidance=g, seed=3) for g in (0.0, 1.0, 3.0)}
    assert by_scale[1.0].shape == (2, 8, 8, 3) and by_scale[1.0].dtype == torch.uint8
    assert not torch.equal(by_scale[0.0], by_scale[1.0]) and not torch.equal(by_scale[1.0], by_scale[3.0])
    # scale 0 is the unconditional model: the prompt does not matter
    other = generate(model, VOCAB, ["three objects", "one yellow triangle"], steps=5, guidance=0.0, seed=3)
    assert torch.equal(other, by_scale[0.0])
    assert torch.equal(generate(model, VOCAB, prompts, steps=5, guidance=3.0, seed=3), by_scale[3.0])
    ddpm = generate(model, VOCAB, prompts, sampler="ddpm", guidance=3.0, seed=3)
    assert ddpm.shape == (2, 8, 8, 3)


def test_attribute_accuracy_reads_objects_left_to_right():
    heads = {"count": 3} | {f"{a}_{s}": n + 1 for s in scenes.SLOTS
                            for a, n in (("shape", 3), ("colour", 4), ("size", 2))}
    torch.manual_seed(0)
    net = EvalNet(EvalNetConfig(image_size=16, width=4, heads=heads)).eval()
    x = torch.rand(6, 3, 8, 8) * 2 - 1                              # upsampled to the net's 16 inside
    with torch.no_grad():
        pred = {h: v.argmax(-1) for h, v in net(torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear",
                                                                                 align_corners=False)).items()}
    assert attribute_accuracy(net, x, pred) == {k: 1.0 for k in ("count", "shape", "colour", "size", "all", "all_slots")}
    wrong = dict(pred, count=(pred["count"] + 1) % 3)
    got = attribute_accuracy(net, x, wrong)
    assert got["count"] == 0 and got["all"] == 0 and got["shape"] == 1
    # the same objects one slot over: right in order, wrong slot by slot
    row = pd.DataFrame([{"n_objects": 1, "shape_left": "circle", "colour_left": "red", "size_left": "small",
                         "shape_middle": "none", "colour_middle": "none", "size_middle": "none",
                         "shape_right": "none", "colour_right": "none", "size_right": "none"}])
    label = scene_labels(row)
    moved = {h: v.clone() for h, v in label.items()}
    for a in ("shape", "colour", "size"):
        moved[f"{a}_middle"], moved[f"{a}_left"] = label[f"{a}_left"].clone(), label[f"{a}_middle"].clone()
    assert label["shape_left"].item() == 1 + scenes.SHAPES.index("circle") and label["count"].item() == 0
    assert moved["colour_middle"].item() == 1 + scenes.COLOURS.index("red")
    assert attribute_hits(moved, label) == {"count": 1, "shape": 1, "colour": 1, "size": 1, "all": 1, "all_slots": 0}
    moved["colour_middle"][0] = 1 + scenes.COLOURS.index("blue")
    assert attribute_hits(moved, label) | {"colour": 0, "all": 0} == attribute_hits(moved, label)


# ----------------------------------------------------------------------------- training and resume


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """img_data and img_validate on a tiny configuration."""
    from forgeline.config import load_config
    from tasks.img_data import ImgDataConfig, img_data
    from tasks.img_validate import ImgValidateConfig, img_validate

    root = tmp_path_factory.mktemp("t2i")
    img_data(load_config(ImgDataConfig, "img_data", [f"out_dir={root}/img_data",
                                                     *(f"{k}={v}" for k, v in TINY["img_data"].items())]))
    manifest = root / "img_data" / "manifest.parquet"
    img_validate(load_config(ImgValidateConfig, "img_validate",
                             [f"manifest={manifest}", f"out_dir={root}/img_validate", "min_images=50"]))
    return {"manifest": manifest, "validation": root / "img_validate" / "result.json"}


def test_t2i_train_refuses_an_unvalidated_manifest_and_resumes_bit_for_bit(tiny_data, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    from forgeline.expectations import GateClosed
    from tasks.t2i_train import T2iTrainConfig, t2i_train

    settings = {k: v for k, v in TINY["t2i_train"].items() if k not in ("mults", "attn_levels")}
    cfg = T2iTrainConfig(manifest=str(tiny_data["manifest"]), validation=str(tiny_data["validation"]),
                         out_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "ckpt"), mults=[1, 2],
                         attn_levels=[1], **{**settings, "max_steps": 6, "ckpt_interval": 3})
    with pytest.raises(GateClosed, match="no validation report"):
        t2i_train(T2iTrainConfig(**{**cfg.__dict__, "validation": str(tmp_path / "missing.json")}))
    first = t2i_train(cfg)
    weights = load_file(tmp_path / "out" / "model.safetensors")
    (root,) = (tmp_path / "ckpt").iterdir()
    shutil.rmtree(root / "step_00000006")          # killed between the step-3 checkpoint and the end
    shutil.rmtree(tmp_path / "out")
    capsys.readouterr()
    second = t2i_train(cfg)
    assert "step_00000003 at step 3" in capsys.readouterr().out
    again = load_file(tmp_path / "out" / "model.safetensors")
    assert second["val_loss"] == first["val_loss"] and second["resumed_at"] == 3
    assert all(torch.equal(weights[k], again[k]) for k in weights)


# ----------------------------------------------------------------------------- the whole pipeline

TINY = {
    "img_data": {"train_scenes": 60, "val_scenes": 10, "test_scenes": 20, "fashion_train": 300, "fashion_val": 50,
                 "fashion_test": 100},
    "img_validate": {"min_images": 50},
    "img_eval_net": {"fashion_steps": 3, "scene_steps": 3, "batch_size": 16, "ckpt_interval": 2, "log_interval": 2,
                     "floor_images": 40, "width": 8, "instrument_scenes": 30},
    "t2i_train": {"base": 8, "mults": "[1,2]", "attn_levels": "[1]", "text_dim": 16, "text_heads": 2,
                  "text_layers": 1, "timesteps": 20, "batch_size": 8, "max_steps": 4, "warmup_steps": 1,
                  "ckpt_interval": 2, "log_interval": 2, "val_images": 8, "threads": 1},
    "t2i_vq": {"hidden": 16, "codebook_size": 16, "code_dim": 8, "disc_width": 8, "batch_size": 8, "max_steps": 4,
               "adv_start": 2, "restart_interval": 2, "ckpt_interval": 2, "log_interval": 2, "warmup_steps": 1,
               "eval_images": 10},
    "t2i_dalle": {"test_images": 10, "n_layer": 1, "n_embd": 32, "n_head": 2, "batch_size": 8, "max_steps": 4,
                  "warmup_steps": 1, "ckpt_interval": 2, "log_interval": 2, "samples": 6, "grid": 2},
    "t2i_eval": {"prompts": 6, "guidances": "[0.0,3.0]", "steps": 3, "steps_sweep": "[2]", "ddpm_prompts": 2,
                 "seen_prompts": 4, "grid": 2, "threads": 1},
}
STAGES = ["img_data", "img_validate", "img_eval_net", "t2i_train", "t2i_vq", "t2i_dalle", "t2i_eval"]


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_tiny_config(workspace):
    ws = workspace
    out = run_in(ws, "-m", "flows.t2i", "--no-push", *cli_overrides(TINY))
    assert stage_lines(out.stdout, STAGES) == {s: "ran" for s in STAGES}, out.stdout[-3000:]
    folder = ws / "data" / "t2i_train"
    assert {"model.safetensors", "config.json", "vocab.json", "loss_curve.png"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "vocab.json").read_text()) == VOCAB
    train = json.loads((folder / "metrics.json").read_text())
    assert train["steps"] == 4 and train["val_loss"] > 0
    metrics = json.loads((ws / "data" / "t2i_eval" / "metrics.json").read_text())
    rows = {r["setting"]: r for r in metrics["rows"]}
    assert list(rows) == ["REFERENCE real scenes", "diffusion DDIM 3 guidance 0", "diffusion DDIM 3 guidance 3",
                          "diffusion DDIM 2 guidance 3", "diffusion DDIM 3 guidance 3, seen pairs (val)",
                          "diffusion DDPM 20 guidance 3", "DALL-E (t2i_dalle) samples"]
    assert rows["diffusion DDIM 3 guidance 3, seen pairs (val)"]["images"] == 4        # seen_prompts of the 10 val scenes
    assert rows["diffusion DDPM 20 guidance 3"]["images"] == 2 and rows["diffusion DDIM 2 guidance 3"]["images"] == 6
    assert rows["DALL-E (t2i_dalle) samples"]["images"] == 6 and rows["DALL-E (t2i_dalle) samples"]["seconds_per_image"] > 0
    for r in rows.values():
        assert all(0 <= r[k] <= 1 for k in ("count", "shape", "colour", "size", "all", "all_slots"))
        assert r["fid"] >= 0 and r["fid_floor"] >= 0 and (ws / "data" / "t2i_eval" / r["grid"]).stat().st_size > 100
    assert "| diffusion DDIM 3 guidance 3 | 6 |" in (ws / "data" / "t2i_eval" / "report.md").read_text()
    again = run_in(ws, "-m", "flows.t2i", "--no-push", *cli_overrides(TINY))
    assert stage_lines(again.stdout, STAGES) == {s: "skipped" for s in STAGES}, again.stdout[-3000:]
