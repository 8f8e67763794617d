"""The face GAN pipeline: rendered faces, the DCGAN shapes, each loss and the WGAN-GP penalty on known
cases, truncation, FID ~0 for identical sets and growing with corruption, resume, and one run of the
whole pipeline on a tiny configuration (slow)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from forgeline.config import load_config
from models.gan import Discriminator, GANConfig, Generator, d_loss, g_loss, gradient_penalty, sample_z
from tests.conftest import cli_overrides, run_in, stage_lines

TINY_DATA = ["train=96", "val=16", "test=48"]
TINY_IMG = ["train_scenes=60", "val_scenes=10", "test_scenes=20", "fashion_train=300", "fashion_val=50",
            "fashion_test=100"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from tasks.gan_data import GanDataConfig, gan_data

    root = tmp_path_factory.mktemp("faces")
    gan_data(load_config(GanDataConfig, "gan_data", [f"out_dir={root}/gan_data", *TINY_DATA]))
    return root


# ----------------------------------------------------------------------------- faces


def test_faces_are_seeded_and_show_their_attributes():
    from tasks.gan_data import ATTRIBUTES, render_face

    attrs = {a: v[0] for a, v in ATTRIBUTES.items()}  # round, light, open eyes, thin brows, bald, ..., no glasses
    a = render_face(np.random.default_rng(5), attrs)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_face(np.random.default_rng(5), attrs))
    with_glasses = render_face(np.random.default_rng(5), {**attrs, "glasses": "yes"})
    diff = np.abs(a.astype(int) - with_glasses.astype(int)).sum(-1) > 60
    rows = np.nonzero(diff.any(1))[0]
    assert diff.sum() > 40 and 20 < rows.mean() < 40   # dark rims around the eyes, in the face's upper half
    long_hair = render_face(np.random.default_rng(5), {**attrs, "hair": "long"})
    assert (np.abs(a.astype(int) - long_hair.astype(int)).sum(-1) > 60).sum() > 300


def test_gan_data_writes_both_sizes_and_a_manifest(faces):
    import pandas as pd

    d = faces / "gan_data"
    m = pd.read_parquet(d / "manifest.parquet")
    assert m["split"].value_counts().to_dict() == {"train": 96, "test": 48, "val": 16}
    with np.load(d / "faces64.npz", allow_pickle=False) as z64, np.load(d / "faces32.npz", allow_pickle=False) as z32:
        assert z64["images"].shape == (160, 64, 64, 3) and z32["images"].shape == (160, 32, 32, 3)
        assert np.abs(z64["images"][:, ::2, ::2].astype(int).mean() - z32["images"].astype(int).mean()) < 3
    attrs = json.loads((d / "attributes.json").read_text())
    assert all(set(m[a]) <= set(v) for a, v in attrs.items())


# ----------------------------------------------------------------------------- models and losses


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_the_chapters_layers(size):
    c = GANConfig(image_size=size, z_dim=16, g_width=8, d_width=8)
    g, d, critic = Generator(c), Discriminator(c), Discriminator(GANConfig(image_size=size, d_width=8, critic=True))
    x = g(torch.randn(5, 16))
    assert x.shape == (5, 3, size, size) and x.abs().max() <= 1
    assert isinstance(g.net[-1], nn.Tanh) and isinstance(g.net[0], nn.ConvTranspose2d)
    p = d(x)
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()
    assert any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())
    assert all(m.stride == (2, 2) for m in d.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(critic(x), critic.logit(x)) and torch.equal(d(x), torch.sigmoid(d.logit(x)))  # score vs P(real)


def test_each_loss_on_a_tiny_batch():
    zero = torch.zeros(4)
    assert d_loss("minimax", zero, zero).item() == pytest.approx(2 * math.log(2))
    assert g_loss("minimax", zero).item() == pytest.approx(-math.log(2))     # log(1 - 1/2)
    assert g_loss("nonsaturating", zero).item() == pytest.approx(math.log(2))
    real, fake = torch.tensor([2.0, 4.0]), torch.tensor([-1.0, 1.0])
    assert d_loss("wgan-gp", real, fake).item() == pytest.approx(0.0 - 3.0)
    assert g_loss("wgan-gp", fake).item() == pytest.approx(0.0)
    # the probability losses equal their textbook forms on D = sigmoid(logit)
    logit = torch.tensor([-3.0, 0.5, 2.0])
    p = torch.sigmoid(logit)
    assert d_loss("minimax", logit, logit).item() == pytest.approx((-(p.log()) - (1 - p).log()).mean().item(), rel=1e-5)
    assert g_loss("nonsaturating", logit).item() == pytest.approx(-(p.log()).mean().item(), rel=1e-5)
    # when D confidently rejects the fakes (D(G(z)) ~ 0), minimax's gradient vanishes, the non-saturating one's does not
    grads = {}
    for kind in ("minimax", "nonsaturating"):
        l = torch.full((8,), -8.0, requires_grad=True)
        g_loss(kind, l).backward()
        grads[kind] = l.grad.abs().sum().item()
    assert grads["minimax"] < 1e-3 < 0.9 < grads["nonsaturating"]


def test_gradient_penalty_of_a_linear_critic():
    """C(x) = w . x has gradient w everywhere: the penalty is (|w| - 1)^2 whatever x_hat."""
    critic = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1, bias=False))
    w = torch.randn(1, 48)
    with torch.no_grad():
        critic[1].weight.copy_(3 * w / w.norm())
    real, fake = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    assert gradient_penalty(lambda x: critic(x).squeeze(1), real, fake).item() == pytest.approx(4.0, rel=1e-5)
    with torch.no_grad():
        critic[1].weight.copy_(w / w.norm())
    assert gradient_penalty(lambda x: critic(x).squeeze(1), real, fake).item() == pytest.approx(0.0, abs=1e-8)


def test_truncation_changes_what_is_sampled():
    g = torch.Generator().manual_seed(0)
    free = sample_z(2000, 8, None, torch.Generator().manual_seed(0))
    cut = sample_z(2000, 8, 0.5, torch.Generator().manual_seed(0))
    assert free.abs().max() > 2 and cut.abs().max() <= 0.5 and cut.std() < 0.35
    assert torch.equal(cut, sample_z(2000, 8, 0.5, torch.Generator().manual_seed(0)))  # seeded
    torch.manual_seed(1)
    gen = Generator(GANConfig(image_size=32, z_dim=8, g_width=8)).eval()
    with torch.no_grad():
        spread_free = gen(free[:200]).std(0).mean()
        spread_cut = gen(cut[:200]).std(0).mean()
    assert spread_cut < spread_free      # truncated samples sit closer together
    with pytest.raises(ValueError):
        sample_z(3, 8, -1.0, g)


def test_fid_is_zero_for_identical_sets_and_grows_with_corruption(faces, tmp_path):
    from forgeline.image_metrics import extractor, generation_scores, save_eval_net
    from forgeline.images import to_tensor
    from models.eval_net import EvalNet, EvalNetConfig

    torch.manual_seed(0)
    net = EvalNet(EvalNetConfig(image_size=32, width=8, heads={"joint": 36})).eval()
    save_eval_net(tmp_path / "net", net)
    ext = extractor(net, "joint", tmp_path / "net")
    with np.load(faces / "gan_data" / "faces32.npz", allow_pickle=False) as z:
        x = to_tensor(z["images"][:96], 32)
    assert generation_scores(ext, x, x)["fid"] == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    fids = [generation_scores(ext, x, (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1))["fid"]
            for s in (0.05, 0.2, 0.5)]
    assert fids[0] < fids[1] < fids[2]


# ----------------------------------------------------------------------------- training


def tiny_train(root, tmp_path, *extra):
    from tasks.gan_train import GanTrainConfig

    return load_config(GanTrainConfig, "gan_train", [
        f"data_dir={root}/gan_data", f"out_dir={tmp_path}/out", f"ckpt_dir={tmp_path}/ck", "g_width=8", "d_width=8",
        "z_dim=16", "batch_size=8", "steps=4", "ckpt_interval=2", "log_interval=2", "eval_interval=4", "eval_samples=16",
        *extra])


@pytest.mark.parametrize("loss", ["minimax", "nonsaturating", "wgan-gp"])
def test_a_killed_run_resumes_to_the_same_weights(faces, tmp_path, loss):
    import shutil

    from safetensors.torch import load_file

    from tasks.gan_train import real_images, train_loss

    cfg = tiny_train(faces, tmp_path, "instance_noise=0.1", "weight_decay=0.0001", "lr_d=0.0004")
    x = real_images(cfg, "train")
    first = train_loss(cfg, loss, x)
    assert first["resumed_at"] == -1 and first["steps"] == 4
    hist = json.loads((tmp_path / "out" / loss / "history.json").read_text())
    assert len(hist["train"]) == 4 and all(math.isfinite(v) for row in hist["train"] for v in row)
    weights = load_file(str(tmp_path / "out" / loss / "generator.safetensors"))
    root = cfg.checkpoint_root(loss)
    shutil.rmtree(root / "step_00000004")             # killed after the step-2 checkpoint
    second = train_loss(cfg, loss, x)
    assert second["resumed_at"] == 2
    again = load_file(str(tmp_path / "out" / loss / "generator.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    third = train_loss(cfg, loss, x)                   # resumed at the end: the training time is kept, not reset
    assert third["resumed_at"] == 4 and third["train_seconds"] == second["train_seconds"] > 0


# ----------------------------------------------------------------------------- the whole pipeline

TINY = {
    "gan_data": dict(a.split("=") for a in TINY_DATA),
    "gan_eval_net": {"steps": 6, "batch_size": 16, "log_interval": 3, "floor_images": 40, "width": 8},
    "gan_train": {"steps": 4, "batch_size": 8, "g_width": 8, "d_width": 8, "z_dim": 16, "ckpt_interval": 2,
                  "log_interval": 2, "eval_interval": 2, "eval_samples": 16, "critic_steps": 2},
    "gan_eval": {"samples": 40, "thresholds": "[0.5,2.0]", "grid": 4},
    "img_data": dict(a.split("=") for a in TINY_IMG),
    "img_validate": {"min_images": 50},
    "img_eval_net": {"fashion_steps": 3, "scene_steps": 3, "batch_size": 16, "ckpt_interval": 2, "log_interval": 2,
                     "floor_images": 40, "width": 8, "instrument_scenes": 30},
    "gan_fashion_train": {"steps": 2, "batch_size": 8, "g_width": 8, "d_width": 8, "z_dim": 16, "ckpt_interval": 2,
                          "log_interval": 2, "eval_interval": 2, "eval_samples": 16, "critic_steps": 2,
                          "train_images": 64},
    "gan_fashion_eval": {"samples": 40, "thresholds": "[1.0]", "grid": 2},
}
STAGES = ["gan_data", "gan_eval_net", "gan_train", "gan_eval", "img_data", "img_validate", "img_eval_net",
          "gan_fashion_train", "gan_fashion_eval"]


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_tiny_config(workspace):
    ws = workspace
    out = run_in(ws, "-m", "flows.gan", "--no-push", *cli_overrides(TINY))
    assert stage_lines(out.stdout, STAGES) == {s: "ran" for s in STAGES}, out.stdout[-3000:]
    net = json.loads((ws / "data" / "gan_eval_net" / "metrics.json").read_text())
    assert net["fid_floor"] > 0 and net["joint_classes"] == 36
    m = json.loads((ws / "data" / "gan_eval" / "metrics.json").read_text())
    assert sorted(m["losses"]) == ["minimax", "nonsaturating", "wgan-gp"]
    for r in m["losses"].values():
        assert r["fid"] > 0 and r["fid_floor"] > 0 and 0 < r["coverage"]["joint"] <= 1 and len(r["fid_over_training"]) == 2
    assert [p["threshold"] for p in m["truncation"]["wgan-gp"]] == [0.5, 2.0]
    report = (ws / "data" / "gan_eval" / "report.md").read_text()
    assert "| nonsaturating |" in report and "| real faces |" in report
    for name in ("truncation.png", "samples_minimax.png", "samples_wgan-gp_truncated.png"):
        assert (ws / "data" / "gan_eval" / name).stat().st_size > 1000
    assert (ws / "data" / "gan_train" / "curves.png").is_file()
    assert net["lfw"]["images"] == 200 and "## skimage.data.lfw_subset" in (ws / "data" / "gan_eval_net" / "report.md").read_text()
    fm = json.loads((ws / "data" / "gan_fashion_eval" / "metrics.json").read_text())
    assert fm["domain"] == "fashion" and sorted(fm["losses"]) == ["nonsaturating", "wgan-gp"]
    assert all(0 < r["coverage"]["class"] <= 1 and r["fid"] > 0 for r in fm["losses"].values())
    assert "| real Fashion-MNIST images |" in (ws / "data" / "gan_fashion_eval" / "report.md").read_text()
    again = run_in(ws, "-m", "flows.gan", "--no-push", *cli_overrides(TINY))
    assert stage_lines(again.stdout, STAGES) == {s: "skipped" for s in STAGES}, again.stdout[-3000:]


# ----------------------------------------------------------------------------- Fashion-MNIST and the LFW check


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """img_data on a tiny configuration (its Fashion-MNIST rows are real) and an untrained 10-class eval net."""
    from forgeline.image_metrics import save_eval_net
    from models.eval_net import EvalNet, EvalNetConfig
    from tasks.img_data import ImgDataConfig, img_data

    root = tmp_path_factory.mktemp("fashion")
    img_data(load_config(ImgDataConfig, "img_data", [f"out_dir={root}/img_data", *TINY_IMG]))
    torch.manual_seed(0)
    save_eval_net(root / "net", EvalNet(EvalNetConfig(image_size=32, width=8, heads={"class": 10})).eval())
    return root


def test_fashion_domain_trains_and_scores_on_a_tiny_batch(fashion, tmp_path):
    from tasks.gan_eval import GanEvalConfig, gan_eval
    from tasks.gan_train import gan_train, real_images

    cfg = tiny_train(fashion, tmp_path, "domain=fashion", f"data_dir={fashion}/img_data", f"eval_net={fashion}/net",
                     "train_images=40", "losses=[nonsaturating,wgan-gp]", "critic_steps=2")
    x = real_images(cfg, "train", cfg.train_images)
    assert x.shape == (40, 3, 32, 32) and -1 <= x.min() < x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])     # grey, repeated to RGB
    assert real_images(cfg, "test", 1000).shape[0] == 100                        # the tiny test split, whole
    summary = gan_train(cfg)
    assert summary["domain"] == "fashion" and summary["train_images"] == 40
    for loss in ("nonsaturating", "wgan-gp"):
        hist = json.loads((tmp_path / "out" / loss / "history.json").read_text())
        assert len(hist["train"]) == 4 and all(math.isfinite(v) for row in hist["train"] for v in row)
        assert math.isfinite(hist["eval"][-1][1])
    m = gan_eval(load_config(GanEvalConfig, "gan_eval", [
        "domain=fashion", f"data_dir={fashion}/img_data", f"eval_net={fashion}/net", f"train_dir={tmp_path}/out",
        f"out_dir={tmp_path}/eval", "samples=40", "thresholds=[1.0]", "grid=2"]))
    assert m["head"] == "class" and m["real"]["images"] == 40
    for r in m["losses"].values():
        assert r["fid"] > 0 and r["coverage"]["class"] in {k / 10 for k in range(1, 11)}
        assert sum(r["class_shares"].values()) == pytest.approx(1.0, abs=1e-3) and len(r["class_shares"]) == 10
    assert "| real Fashion-MNIST images |" in (tmp_path / "eval" / "report.md").read_text()


def test_auc_and_nearest_centroid_on_known_cases():
    from tasks.gan_eval_net import auc, nearest_centroid_loo

    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auc(torch.ones(3), torch.ones(4)) == 0.5
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) < 20
    apart = torch.randn(40, 5, generator=g) + 4.0 * y[:, None]
    assert nearest_centroid_loo(apart, y) == 1.0
    assert nearest_centroid_loo(torch.randn(40, 5, generator=g), y) < 0.8


def test_lfw_check_reads_the_shipped_faces(faces):
    from models.eval_net import EvalNet, EvalNetConfig
    from tasks.gan_eval_net import head_classes, lfw_check, lfw_report

    heads = head_classes(json.loads((faces / "gan_data" / "attributes.json").read_text()))
    torch.manual_seed(0)
    net = EvalNet(EvalNetConfig(image_size=32, width=8, heads={h: len(v) for h, v in heads.items()})).eval()
    with np.load(faces / "gan_data" / "faces32.npz", allow_pickle=False) as z:
        from forgeline.images import to_tensor
        synthetic = to_tensor(z["images"][:48], 32)
    r = lfw_check(net, heads, 32, synthetic)
    assert (r["images"], r["faces"], r["non_faces"]) == (200, 100, 100)
    for h, p in r["predicted"].items():
        for group in ("faces", "non_faces"):
            assert sum(p[group].values()) == pytest.approx(1.0, abs=0.01) and set(p[group]) <= set(heads[h])
        assert 0 <= r["total_variation"][h] <= 1
    assert 0 <= r["confidence_auc"] <= 1 and 0.5 <= r["pixels_nearest_centroid"] <= 1
    assert "| hair_colour |" in lfw_report(r) and "## skimage.data.lfw_subset" in lfw_report(r)
