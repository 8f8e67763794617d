"""Reward model: the margin loss at and around the margin, the scalar head on the GPT trunk, and a
reward stage that learns the tiny world's preferences well above chance (and resumes exactly)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgeline.chat import is_correct, read_jsonl
from forgeline.checkpoint import latest_checkpoint, load_model_folder
from models.gpt import GPT, GPTConfig
from models.reward_model import RewardModel, pairwise_margin_loss
from tasks.reward import RewardConfig, batch_indices, mixed_batch, reward
from tasks.sft import sft
from tests.test_sft import make_world, tiny_sft


def test_margin_loss_at_and_around_the_margin():
    margin = 1.0
    gaps = torch.tensor([-1.0, 0.0, 0.5, 0.999, 1.0, 1.001, 3.0])
    chosen = gaps.clone().requires_grad_(True)
    rejected = torch.zeros(len(gaps), requires_grad=True)
    per_pair = [pairwise_margin_loss(chosen[i:i + 1], rejected[i:i + 1], margin) for i in range(len(gaps))]
    expected = [2.0, 1.0, 0.5, 0.001, 0.0, 0.0, 0.0]
    for got, want in zip(per_pair, expected):
        assert got.item() == pytest.approx(want, abs=1e-6)
    # below the margin each pair pushes chosen up and rejected down at slope 1 (mean over pairs);
    # at or above it, nothing
    pairwise_margin_loss(chosen, rejected, margin).backward()
    n = len(gaps)
    assert chosen.grad.tolist() == pytest.approx([-1 / n] * 4 + [0.0] * 3)
    assert rejected.grad.tolist() == pytest.approx([1 / n] * 4 + [0.0] * 3)
    # margin 0: only pairs ordered the wrong way cost anything
    assert pairwise_margin_loss(torch.tensor([0.2]), torch.tensor([0.0]), 0.0).item() == 0.0
    assert pairwise_margin_loss(torch.tensor([0.0]), torch.tensor([0.2]), 0.0).item() == pytest.approx(0.2)


@pytest.mark.parametrize("pos", ["rope", "sincos", "learned"])
def test_hidden_is_the_gpt_without_its_head(pos):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_encoding=pos)).eval()
    idx = torch.randint(64, (3, 12))
    torch.testing.assert_close(gpt.lm_head(gpt.hidden(idx)), gpt(idx)[0])


def test_score_is_read_at_last_token_and_ignores_right_padding():
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    seq = torch.randint(1, 64, (1, 7))
    padded = torch.cat([seq, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(rm(seq, torch.tensor([6])), rm(padded, torch.tensor([6])))
    assert rm(padded, torch.tensor([6])).shape == (1,)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    w = make_world(root)
    sft(tiny_sft(w, root, max_steps=150))
    return {**w, "sft": root / "sft"}


def tiny_reward(world: dict, tmp: Path, **kw) -> RewardConfig:
    base = dict(sft_dir=str(world["sft"]), data_dir=str(world["data"]), out_dir=str(tmp / "reward"),
                ckpt_dir=str(tmp / "ckpt"), margin=1.0, sampled_prompts=300, batch_size=32, max_steps=80,
                lr=2e-3, min_lr=2e-4, warmup_steps=5, eval_interval=40, ckpt_interval=40, log_interval=20, seed=0)
    base.update(kw)
    return RewardConfig(**base)


def test_reward_model_learns_preferences_well_above_chance(world, tmp_path):
    metrics = reward(tiny_reward(world, tmp_path))
    # a random head scores pairs by accident (one rule's rejected replies may share a feature)
    assert metrics["pairwise_accuracy"] > max(0.8, metrics["init_pairwise_accuracy"] + 0.2), metrics
    assert metrics["pairwise_accuracy.off_topic"] > 0.9
    rm = load_model_folder(tmp_path / "reward", RewardModel)
    assert isinstance(rm, RewardModel) and rm.gpt.config.n_layer == 2
    # the SFT model's own mistakes: each rejected reply is one the checker marks wrong
    sampled = read_jsonl(tmp_path / "reward" / "sampled_pairs_train.jsonl")
    assert 0 < len(sampled) <= 300 and metrics["sampled_pairs_train"] == len(sampled)
    for r in sampled:
        assert r["rule"] == "sampled_mistake" and r["chosen"] == r["answer"]
        assert not is_correct(r["rejected"], r["answer"])
    assert "pairwise_accuracy.sampled_mistake" in metrics


def test_mixed_batch_takes_its_share_from_the_sampled_pairs():
    rules, sampled = [("r", i) for i in range(50)], [("s", i) for i in range(7)]
    batch = mixed_batch(rules, sampled, batch_size=8, fraction=0.25, seed=0, step=3)
    assert [kind for kind, _ in batch] == ["r"] * 6 + ["s"] * 2
    assert mixed_batch(rules, [], 8, 0.25, 0, 3) == [rules[i] for i in batch_indices(50, 8, 0, 3)]


def test_exact_resume_after_crash(world, tmp_path):
    full = tiny_reward(world, tmp_path / "full", max_steps=8, ckpt_interval=3, eval_interval=4, log_interval=1)
    reward(full)
    crashed = replace(full, out_dir=str(tmp_path / "crash" / "reward"), ckpt_dir=str(tmp_path / "crash" / "ckpt"))

    def crash(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reward(crashed, log=crash)
    assert latest_checkpoint(crashed.checkpoint_root()).name == "step_00000003"
    reward(crashed)
    a = load_file(Path(full.out_dir) / "model.safetensors")
    b = load_file(Path(crashed.out_dir) / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
