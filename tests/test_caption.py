"""The captioning pipeline: scenes and their captions, the split by held-out combination, the GX gate,
the caption model's encoders and decoding, the evaluation network and FID floor, resume, the
/v1/caption route's answers, and one run of the whole pipeline on a tiny configuration (slow)."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from forgeline import scenes
from forgeline.config import load_config
from models.caption import POSITIONS, CaptionConfig, CaptionModel, patchify, teacher_forcing
from models.seq2seq import beam_search, greedy
from tests.conftest import cli_overrides, run_in, stage_lines

TINY_DATA = ["train_scenes=120", "val_scenes=20", "test_scenes=30", "fashion_train=300", "fashion_val=50",
             "fashion_test=100"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """img_data and img_validate on a tiny configuration: {"root", "manifest", "validation"}."""
    from tasks.img_data import ImgDataConfig, img_data
    from tasks.img_validate import ImgValidateConfig, img_validate

    root = tmp_path_factory.mktemp("img")
    img_data(load_config(ImgDataConfig, "img_data", [f"out_dir={root}/img_data", *TINY_DATA]))
    manifest = root / "img_data" / "manifest.parquet"
    img_validate(load_config(ImgValidateConfig, "img_validate",
                             [f"manifest={manifest}", f"out_dir={root}/img_validate", "min_images=100"]))
    return {"root": root, "manifest": manifest, "validation": root / "img_validate" / "result.json"}


# ----------------------------------------------------------------------------- scenes and captions


def test_every_phrasing_parses_back_to_its_scene():
    rng = np.random.default_rng(3)
    pairs = [(s, c) for s in scenes.SHAPES for c in scenes.COLOURS]
    for _ in range(60):
        objs = scenes.layout(rng, [scenes.sample_object(rng, pairs) for _ in range(int(rng.integers(1, 4)))])
        caps = scenes.captions(objs)
        assert len(set(caps)) == 6 and all(set(c.split()) <= scenes.VISUAL_WORDS for c in caps)
        for c in caps:
            s = scenes.attribute_scores(c, objs)
            assert s["objects"] == s["shapes"] == s["colours"] == s["count"] == 1.0, (c, objs)
        assert sum(scenes.attribute_scores(c, objs)["sizes"] for c in caps) >= 5  # one phrasing leaves sizes out
    objs = [{"shape": "circle", "colour": "red", "size": "small", "slot": "left"},
            {"shape": "square", "colour": "blue", "size": "large", "slot": "right"}]
    wrong = scenes.attribute_scores("a small red square left of a large blue circle", objs)
    assert wrong["objects"] == 0 and wrong["shapes"] == wrong["colours"] == wrong["sizes"] == wrong["count"] == 1
    assert scenes.attribute_scores("a small red circle", objs)["count"] == 0
    assert scenes.parse_caption("two squares a small red one and a large blue one")["objects"] == [
        ("small", "red", "square"), ("large", "blue", "square")]


def test_render_is_deterministic_and_draws_the_colour_where_the_slot_is():
    objs = [{"shape": "square", "colour": "red", "size": "large", "slot": "left"}]
    a, b = (scenes.render(np.random.default_rng(7), objs) for _ in range(2))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    red = (a[..., 0].astype(int) - a[..., 2] > 100)
    assert red[:, :21].sum() > 100 and red[:, 43:].sum() == 0
    assert scenes.downsample(a[None]).shape == (1, 32, 32, 3)


def test_word_filter_keeps_only_what_a_scene_can_show():
    assert scenes.filter_words("a happy red circle near a famous square") == ("a red circle a square",
                                                                              ["happy", "near", "famous"])


def test_split_holds_out_combinations_and_reads_fashion_in_place(tiny):
    m = pd.read_parquet(tiny["manifest"])
    summary = json.loads((tiny["root"] / "img_data" / "summary.json").read_text())
    held = {tuple(p.split(":")) for p in summary["held_out_pairs"]}
    sc = m[m["source"] == "scene"]
    pairs = sc["objects"].map(lambda o: {(x["shape"], x["colour"]) for x in json.loads(o)})
    assert not any(p & held for p in pairs[sc["split"] != "test"])
    assert all(p & held for p in pairs[sc["split"] == "test"])
    fa = m[m["source"] == "fashion"]
    assert fa.groupby("split").size().to_dict() == {"test": 100, "train": 300, "val": 50}
    assert set(fa["file"]) == {"fashion:train", "fashion:t10k"} and summary["fashion"]["version"] != ""
    assert not list((tiny["root"] / "img_data").glob("*fashion*"))  # read in place, never copied
    with np.load(tiny["root"] / "img_data" / "scenes64.npz", allow_pickle=False) as z:
        assert z["images"].shape == (170, 64, 64, 3)


def test_validation_names_a_bad_caption(tiny, tmp_path):
    from tasks.img_validate import ImgValidateConfig, ValidationFailed, img_validate

    m = pd.read_parquet(tiny["manifest"])
    m.at[0, "captions"] = ["a small purple hexagon", *m.at[0, "captions"][1:]]
    data = tmp_path / "img_data"
    shutil.copytree(tiny["root"] / "img_data", data)
    m.to_parquet(data / "manifest.parquet", index=False)
    with pytest.raises(ValidationFailed, match="oov_words"):
        img_validate(ImgValidateConfig(manifest=str(data / "manifest.parquet"), out_dir=str(tmp_path / "v"),
                                       min_images=100))
    assert json.loads((tmp_path / "v" / "result.json").read_text())["failures"][0]["unexpected_count"] == 1


# ----------------------------------------------------------------------------- the caption model


def tiny_model(encoder: str, pos: str = "2d-sincos", seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    return CaptionModel(CaptionConfig(vocab_size=40, encoder=encoder, pos=pos, image_size=32, patch_size=8,
                                      cnn_width=8, d_model=32, d_ff=64, max_len=12, dropout=0.0)).eval()


def test_patchify_and_two_dimensional_positions():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12) and torch.equal(p[0, 1].view(2, 2, 3)[..., 0], x[0, 0, :2, 2:])
    enc = tiny_model("vit", "2d-sincos").encoder
    pos = enc.positions()  # 4x4 grid: patches in one row share the first half, in one column the second
    assert torch.equal(pos[0, :16], pos[3, :16]) and not torch.equal(pos[0, 16:], pos[3, 16:])
    assert torch.equal(pos[0, 16:], pos[4, 16:]) and not torch.equal(pos[0, :16], pos[4, :16])


@pytest.mark.parametrize("encoder,pos", [("cnn", "2d-sincos"), *[("vit", p) for p in POSITIONS]])
def test_encoders_shapes_loss_and_cached_decoding(encoder, pos):
    model = tiny_model(encoder, pos)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    memory, mask = model.encode(images)
    assert memory.shape == (3, 9 if encoder == "cnn" else 16, 32) and mask.all()
    tgt_in, tgt_out = teacher_forcing([[5, 6, 7], [8], [9, 10]], model.config)
    logits, loss = model(images, tgt_in, tgt_out)
    assert logits.shape == (3, 4, 40) and abs(loss.item() - np.log(40)) < 0.5
    changed = tgt_in.clone()
    changed[:, 3] = 11  # causal: a later token changes no earlier position
    assert torch.allclose(model(images, changed)[0][:, :3], logits[:, :3], atol=1e-6)
    cached, c1 = greedy(model, images, 10)
    full, c2 = greedy(model, images, 10, use_cache=False)
    assert cached == full and np.allclose(c1, c2, atol=1e-5)
    beams, _ = beam_search(model, images, 10, width=3)
    assert len(beams) == 3 and all(t not in (0, 2) for row in beams for t in row)


def test_eval_net_and_the_fid_floor():
    from forgeline import metrics
    from forgeline.image_metrics import fid_floor
    from models.eval_net import EvalNet, EvalNetConfig

    torch.manual_seed(0)
    net = EvalNet(EvalNetConfig(image_size=32, width=8, heads={"a": 3, "b": 5})).eval()
    x = torch.rand(40, 3, 32, 32) * 2 - 1
    out = net(x)
    assert net.features(x).shape == (40, 32) and out["a"].shape == (40, 3) and out["b"].shape == (40, 5)
    ext = metrics.FeatureExtractor("test", net.features, lambda t: net(t)["a"])
    floor = fid_floor(ext, x)
    shifted = metrics.fid(net.features(x[:20]).detach(), net.features(x[20:] + 0.5).detach())
    assert 0 < floor < shifted  # a real-vs-real gap, smaller than a shifted distribution's


def test_eval_net_augmentations_hide_colour_or_shape():
    from tasks.img_eval_net import batch_at, colour_blind, shape_blind

    from forgeline.images import to_tensor

    objs = [{"shape": "triangle", "colour": "blue", "size": "large", "slot": "middle"}]
    x = to_tensor(scenes.render(np.random.default_rng(1), objs, noise=0)[None], 64).repeat(2, 1, 1, 1)
    grey = colour_blind(x, torch.tensor([True, True]), torch.tensor([0, 5]))  # grey; channels reversed
    assert torch.allclose(grey[0, 0], grey[0, 2]) and torch.equal(grey[1], x[1].flip(0))
    blob = shape_blind(x, torch.tensor([True, False]))
    assert torch.equal(blob[1], x[1]) and torch.equal(blob[0, :, :8, :8], blob[0, :, :1, :1].expand(3, 8, 8))
    _, _, blinds, _, blobs, _ = batch_at(10, 1000, 0, 3, flip=False, blind=0.4, blob=0.3)
    assert not (blinds & blobs).any() and abs(blinds.float().mean() - 0.4) < 0.05 and abs(blobs.float().mean() - 0.3) < 0.05


def test_the_eval_net_sees_every_pair_in_its_own_renders_and_32x32_as_generators_give_it():
    from tasks.img_data import ImgDataConfig
    from tasks.img_eval_net import ImgEvalNetConfig, instrument_scenes, low_resolution, scene_heads

    from forgeline.images import to_tensor

    images, labels = instrument_scenes(ImgEvalNetConfig(instrument_scenes=120))
    heads = scene_heads()
    pairs = {(heads[f"shape_{s}"][a], heads[f"colour_{s}"][b]) for s in scenes.SLOTS
             for a, b in zip(labels[f"shape_{s}"].tolist(), labels[f"colour_{s}"].tolist()) if a}
    assert images.shape == (120, 64, 64, 3) and set(ImgDataConfig().pairs()) < pairs  # held-out pairs included
    assert sorted(set(labels["count"].tolist())) == [0, 1, 2]
    x = to_tensor(images[:2], 64)
    low = low_resolution(x, torch.tensor([True, False]))
    assert torch.equal(low[1], x[1])
    assert torch.allclose(low[0], to_tensor(scenes.downsample(images[:1], 2), 64)[0], atol=0.02)


# ----------------------------------------------------------------------------- training, resume, evaluation


def cap_cfg(tiny, tmp_path, **kw):
    from tasks.cap_train import CapTrainConfig

    settings = dict(manifest=str(tiny["manifest"]), validation=str(tiny["validation"]),
                    out_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "ckpt"), variants=["cnn"],
                    image_size=32, patch_size=8, cnn_width=8, d_model=32, d_ff=64, batch_size=8,
                    max_steps=4, ckpt_interval=2, log_interval=2, eval_batches=1, warmup_steps=1)
    return CapTrainConfig(**{**settings, **kw})


def test_cap_train_refuses_an_unvalidated_manifest_and_resumes_bit_for_bit(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    from tasks.cap_train import GateClosed, cap_train

    with pytest.raises(GateClosed, match="no validation report"):
        cap_train(cap_cfg(tiny, tmp_path, validation=str(tmp_path / "missing.json")))
    cfg = cap_cfg(tiny, tmp_path)
    first = cap_train(cfg)
    weights = load_file(tmp_path / "out" / "cnn" / "model.safetensors")
    (root,) = (tmp_path / "ckpt").iterdir()
    shutil.rmtree(root / "cnn" / "step_00000004")  # killed between the step-2 checkpoint and the end
    shutil.rmtree(tmp_path / "out")
    capsys.readouterr()
    second = cap_train(cfg)
    assert "step_00000002 at step 2" in capsys.readouterr().out
    again = load_file(tmp_path / "out" / "cnn" / "model.safetensors")
    assert second["variants"]["cnn"]["val_loss"] == first["variants"]["cnn"]["val_loss"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)


# ----------------------------------------------------------------------------- the route


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_caption_route(tiny, tmp_path, monkeypatch):
    from PIL import Image

    import serve.caption as route
    from serve.app import create_app
    from tasks.cap_train import cap_train

    cap_train(cap_cfg(tiny, tmp_path))
    monkeypatch.setenv("FORGELINE_CAPTION_MODEL", str(tmp_path / "out" / "cnn"))
    monkeypatch.setattr(route, "MODEL", route._Model())
    client = TestClient(create_app([("caption", route.router)]))
    scene = scenes.render(np.random.default_rng(0), [{"shape": "circle", "colour": "red", "size": "large", "slot": "left"}])
    r = client.post("/v1/caption?beam=2", content=png(scene), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "cnn" and body["image_size"] == [64, 64] and body["beam"] == 2
    assert set(body["caption"].split()) <= scenes.VISUAL_WORDS and body["confidence"] <= 0
    big = io.BytesIO()
    Image.new("1", (5000, 4000)).save(big, format="PNG")  # small file, too many pixels
    for data, status, words in [(b"", 400, "empty"), (b"not an image at all", 400, "not a readable image"),
                                (png(scene)[:60], 400, "not a readable image"),
                                (big.getvalue(), 400, "pixels"), (b"x" * (route.MAX_BYTES + 1), 413, "bytes")]:
        r = client.post("/v1/caption", content=data)
        assert r.status_code == status and words in r.json()["detail"], (status, r.text)
    assert client.post("/v1/caption?beam=9", content=png(scene)).status_code == 400


# ----------------------------------------------------------------------------- the whole pipeline

TINY = {
    "img_data": dict(a.split("=") for a in TINY_DATA),
    "img_validate": {"min_images": 100},
    "img_eval_net": {"fashion_steps": 4, "scene_steps": 4, "batch_size": 16, "ckpt_interval": 2, "log_interval": 2,
                     "floor_images": 40, "width": 8, "instrument_scenes": 30},
    "cap_train": {"variants": "[cnn,vit-2d-sincos]", "max_steps": 4, "batch_size": 8, "ckpt_interval": 2,
                  "log_interval": 2, "eval_batches": 1, "warmup_steps": 1, "d_model": 32, "d_ff": 64, "cnn_width": 8},
    "cap_eval": {"max_images": 6, "beam_width": 2, "examples": 2},
}
STAGES = ["img_data", "img_validate", "img_eval_net", "cap_train", "cap_eval"]


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_tiny_config(workspace):
    ws = workspace
    out = run_in(ws, "-m", "flows.caption", "--no-push", *cli_overrides(TINY))
    assert stage_lines(out.stdout, STAGES) == {s: "ran" for s in STAGES}, out.stdout[-3000:]
    assert json.loads((ws / "data" / "img_validate" / "result.json").read_text())["success"]
    net = json.loads((ws / "data" / "img_eval_net" / "metrics.json").read_text())
    assert set(net) == {"fashion", "scenes"} and all(r["fid_floor"] > 0 for r in net.values())
    metrics = json.loads((ws / "data" / "cap_eval" / "metrics.json").read_text())
    assert sorted(metrics["variants"]) == ["cnn", "vit-2d-sincos"]
    for r in metrics["variants"].values():
        assert set(r) == {"test/greedy", "test/beam", "val/greedy", "val/beam"}
        assert {"cider", "bleu4", "meteor", "attr_objects", "novel_named"} <= set(r["test/beam"])
    assert "| cnn | test | beam |" in (ws / "data" / "cap_eval" / "report.md").read_text()
    again = run_in(ws, "-m", "flows.caption", "--no-push", *cli_overrides(TINY))
    assert stage_lines(again.stdout, STAGES) == {s: "skipped" for s in STAGES}, again.stdout[-3000:]
