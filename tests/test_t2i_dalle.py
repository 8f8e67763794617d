"""The DALL-E form of text-to-image: the GPT's 2D positions (shapes, that they change the logits, that
the KV cache agrees with a full forward), the loss on the image tokens only, captions as token ids,
top-p changing what is sampled, and t2i_vq + t2i_dalle on a tiny configuration (slow)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from forgeline.config import load_config
from models.gpt import GPT, GPTConfig, KVCache, grid_positions

GRID = dict(grid_h=3, grid_w=4, grid_start=5)   # a 5-token prefix, then a 3 x 4 grid


def small(**kw) -> GPTConfig:
    return GPTConfig(**{"vocab_size": 30, "block_size": 17, "n_layer": 1, "n_head": 2, "n_embd": 16,
                        "pos_encoding": "learned", **kw})


def test_grid_positions_and_2d_encoding_shapes():
    row, col, inside = grid_positions(torch.arange(19), **{"start": 5, "h": 3, "w": 4})
    assert inside.tolist() == [False] * 5 + [True] * 12 + [False] * 2
    assert row[5:17].tolist() == [0] * 4 + [1] * 4 + [2] * 4 and col[5:17].tolist() == [0, 1, 2, 3] * 3
    for kind in ("learned", "sincos"):
        model = GPT(small(pos_2d=kind, **GRID))
        enc = model.grid_encoding(torch.arange(17))
        assert enc.shape == (17, 16)
        assert enc[:5].abs().sum() == 0 and (enc[5:].abs().sum(-1) > 0).all()   # the prefix keeps only 1D
        assert model.grid_encoding(torch.arange(17).expand(2, -1)).shape == (2, 17, 16)   # per-row positions
    learned = GPT(small(pos_2d="learned", **GRID))
    assert learned.wre.weight.shape == (3, 16) and learned.wce.weight.shape == (4, 16)
    # tokens in one row share its row encoding: enc(r, c) - enc(r, c') is the same in every row
    enc = learned.grid_encoding(torch.arange(5, 17)).view(3, 4, 16)
    assert torch.allclose(enc[0, 1] - enc[0, 0], enc[2, 1] - enc[2, 0])
    with pytest.raises(ValueError, match="grid_h"):
        small(pos_2d="learned")
    assert GPT(small()).wre is None and "pos_2d" not in [n for n, _ in GPT(small()).named_parameters()]


@pytest.mark.parametrize("kind", ["learned", "sincos"])
def test_2d_positions_change_the_logits_and_agree_with_the_kv_cache(kind):
    idx = torch.randint(30, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = GPT(small()).eval()
    torch.manual_seed(0)
    grid = GPT(small(pos_2d=kind, **GRID)).eval()
    grid.load_state_dict(plain.state_dict(), strict=False)          # the same weights but the row/column tables
    with torch.no_grad():
        a, b = plain(idx)[0], grid(idx)[0]
        assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)          # the prefix (causal) keeps its 1D positions
        assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)
        cache = KVCache(1, 17)
        step_by_step = torch.cat([grid(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(17)], 1)
    assert torch.allclose(b, step_by_step, atol=1e-5)


def test_old_config_json_loads_as_1d():
    """A model folder written before pos_2d existed (no such keys) loads with 2D off."""
    from dataclasses import asdict

    from forgeline.checkpoint import same_config

    old = {k: v for k, v in asdict(small()).items() if k not in ("pos_2d", "grid_h", "grid_w", "grid_start")}
    assert GPTConfig(**old).pos_2d == "none"
    assert same_config(old, small()) and not same_config(old, small(pos_2d="learned", **GRID))


def test_the_loss_is_on_the_image_tokens_only_unless_text_weight():
    from tasks.t2i_dalle import WORDS, caption_tokens, dalle_loss

    K, L = 8, 6
    ids = caption_tokens("a small RED circle xyzzy on the left of everything", K, L)
    assert ids == [K + 2 + WORDS.index(w) for w in "a small red circle on the".split()]   # unknown words dropped
    assert caption_tokens("two circles", K, L)[2:] == [K + 1] * 4                          # PAD after
    torch.manual_seed(0)
    model = GPT(small(vocab_size=K + 2 + len(WORDS), block_size=L + 1 + 12, pos_2d="learned", grid_h=3, grid_w=4,
                      grid_start=L + 1))
    seqs = torch.cat([torch.tensor([ids, caption_tokens("two circles", K, L)]), torch.full((2, 1), K),
                      torch.randint(K, (2, 12))], 1)
    loss, image = dalle_loss(model, seqs, L, 0.0)
    assert loss is image
    # changing the caption's later words changes no image target, only the condition; changing a code does
    other = seqs.clone()
    other[:, 12] = (other[:, 12] + 1) % K
    assert dalle_loss(model, other, L, 0.0)[1] != image
    loss.backward()
    # with text_weight the word targets pull on their rows of the LM head too
    words_grad = model.lm_head.weight.grad[K + 2:].clone()
    model.zero_grad()
    weighted, image2 = dalle_loss(model, seqs, L, 0.5)
    assert torch.isclose(image2, image) and weighted > image
    with torch.no_grad():
        h = model.hidden(seqs[:, :-1])
        logp = model.lm_head(h).log_softmax(-1)
        nll = -logp.gather(-1, seqs[:, 1:, None]).squeeze(-1)      # (B, T) per-target NLL
    assert math.isclose(image.item(), nll[:, L:].mean().item(), rel_tol=1e-5)
    assert math.isclose(weighted.item(), nll[:, L:].mean().item() + 0.5 * nll[:, :L].mean().item(), rel_tol=1e-5)
    weighted.backward()
    assert not torch.allclose(model.lm_head.weight.grad[K + 2:], words_grad)


def test_top_p_changes_what_is_sampled():
    from models.vqvae import VQVAE, VQVAEConfig
    from tasks.t2i_dalle import T2iDalleConfig, sample_codes, sample_images

    torch.manual_seed(0)
    model = GPT(small(vocab_size=12, block_size=4 + 16, pos_2d="learned", grid_h=4, grid_w=4, grid_start=4)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5)                 # peaked distributions, as a trained model's
    prompts = [[9, 10, 11, 8]] * 30

    def draw(top_p: float) -> torch.Tensor:
        return sample_codes(model, prompts, 8, 16, T2iDalleConfig(top_p=top_p, seed=3, sample_batch=30))[0]

    full, nucleus, tiny = draw(1.0), draw(0.5), draw(1e-6)
    assert full.shape == (30, 16) and 0 <= full.min() and full.max() < 8
    assert not torch.equal(full, nucleus)
    assert len({tuple(r) for r in tiny.tolist()}) == 1              # top-p -> 0: the greedy continuation only
    # a nucleus narrows the samples toward the most likely continuation
    assert (nucleus == tiny).float().mean() > (full == tiny).float().mean()
    vq = VQVAE(VQVAEConfig(image_size=16, hidden=8, n_down=2, codebook_size=8, code_dim=4)).eval()   # 4x4 grid
    images, _ = sample_images(model, vq, prompts[:3], T2iDalleConfig(seed=3))
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8


# ----------------------------------------------------------------------------- t2i_vq + t2i_dalle, tiny

TINY_DATA = ["train_scenes=60", "val_scenes=10", "test_scenes=20", "fashion_train=100", "fashion_val=20",
             "fashion_test=20"]


@pytest.mark.slow
def test_t2i_vq_and_t2i_dalle_on_a_tiny_config(tmp_path):
    from tasks.img_data import ImgDataConfig, img_data
    from tasks.img_eval_net import ImgEvalNetConfig, img_eval_net
    from tasks.img_validate import ImgValidateConfig, img_validate
    from tasks.t2i_dalle import T2iDalleConfig, t2i_dalle
    from tasks.vq_train import VqTrainConfig, vq_train

    img_data(load_config(ImgDataConfig, "img_data", [f"out_dir={tmp_path}/img_data", *TINY_DATA]))
    manifest, validation = tmp_path / "img_data" / "manifest.parquet", tmp_path / "img_validate" / "result.json"
    img_validate(load_config(ImgValidateConfig, "img_validate",
                             [f"manifest={manifest}", f"out_dir={tmp_path}/img_validate", "min_images=50"]))
    img_eval_net(ImgEvalNetConfig(manifest=str(manifest), validation=str(validation), out_dir=str(tmp_path / "net"),
                                  ckpt_dir=str(tmp_path / "net_ckpt"), width=8, batch_size=16, fashion_steps=2,
                                  scene_steps=2, ckpt_interval=2, log_interval=2, floor_images=20,
                                  instrument_scenes=30))
    data = [f"manifest={manifest}", f"validation={validation}"]
    vq_cfg = load_config(VqTrainConfig, "t2i_vq", [
        *data, f"eval_net={tmp_path / 'net'}", f"out_dir={tmp_path / 't2i_vq'}", f"ckpt_dir={tmp_path / 'vq_ckpt'}",
        "hidden=16", "codebook_size=16", "code_dim=8", "disc_width=8", "batch_size=8", "max_steps=4", "adv_start=2",
        "restart_interval=2", "ckpt_interval=2", "log_interval=2", "warmup_steps=1", "eval_images=10"],
        path="configs/t2i_vq.yaml")
    assert vq_cfg.domain == "scenes" and vq_cfg.image_size == 32     # the stage's own config file
    vq = vq_train(vq_cfg)          # the scenes eval net is 64x64: the perceptual term upsamples 32 -> 64
    assert vq["domain"] == "scenes" and vq["train_images"] == 60 and vq["test"]["psnr"] > 0
    cfg = load_config(T2iDalleConfig, "t2i_dalle", [
        *data, f"vqvae={tmp_path / 't2i_vq'}", f"out_dir={tmp_path / 'dalle'}", f"ckpt_dir={tmp_path / 'ckpt'}",
        "test_images=10", "n_layer=1", "n_embd=32", "n_head=2", "batch_size=8", "max_steps=4", "warmup_steps=1",
        "ckpt_interval=2", "log_interval=2", "samples=6", "grid=2"], path="configs/t2i_dalle.yaml")
    first = t2i_dalle(cfg)
    out = tmp_path / "dalle"
    assert first["steps"] == 4 and 0 < first["test_bits_per_image_token"] and first["positions"] == "2d"
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        images, ids, seconds = z["images"], z["image_ids"], float(z["seconds_per_image"])
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8 and seconds > 0
    manifest_df = __import__("pandas").read_parquet(manifest)
    test = manifest_df[(manifest_df.source == "scene") & (manifest_df.split == "test")]
    assert set(ids) <= set(test.image_id) and len(set(ids)) == 6
    assert (out / "samples.png").stat().st_size > 100
    from forgeline.checkpoint import load_model_folder

    model = load_model_folder(out)                              # safetensors + json, no pickle
    assert model.config.pos_2d == "learned" and model.config.grid_start == 25
    assert json.loads((out / "dalle.json").read_text())["bos_token"] == 16
    # killed after the step-2 checkpoint: the rerun resumes there and ends where the first run did
    (root,) = (tmp_path / "ckpt").iterdir()
    shutil.rmtree(root / "step_00000004")
    second = t2i_dalle(cfg)
    assert second["resumed_at"] == 2 and second["test_nll_nats_per_image_token"] == first["test_nll_nats_per_image_token"]
