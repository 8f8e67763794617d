"""RLHF: DPO's loss is log 2 at the reference, PPO's clip bounds the ratio, GAE, and both loops
improve their metric on the tiny world (PPO: reward; DPO: held-out preference loss); PPO resumes exactly."""
from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from forgeline.chat import encode_pairs, load_tokenizer, read_jsonl, write_jsonl
from forgeline.checkpoint import latest_checkpoint, load_model_folder
from forgeline.config import ConfigError
from tasks.reward import RewardConfig, reward
from tasks.rlhf import RLHFConfig, rlhf
from tasks.rlhf.common import reply_batch
from tasks.rlhf.dpo import dpo_loss, mixed_batch, sequence_logprobs
from tasks.rlhf.ppo import centre_by_prompt, gae, ppo_policy_loss
from tasks.sft import sft
from tests.test_sft import ROOT, make_world, tiny_sft


# ----------------------------------------------------------------------------- losses


def test_dpo_loss_is_log2_when_policy_is_the_reference():
    torch.manual_seed(0)
    c, r = torch.randn(16) * 5, torch.randn(16) * 5
    loss, margins = dpo_loss(c, r, c.clone(), r.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and (margins == 0).all()
    # the chosen reply gaining probability relative to the reference lowers the loss
    assert dpo_loss(c + 1, r, c, r, beta=0.1)[0].item() < math.log(2) < dpo_loss(c - 1, r, c, r, beta=0.1)[0].item()


def test_scores_count_relative_to_the_prompts_other_replies():
    scores = torch.tensor([1.0, 3.0, 5.0, 7.0, -2.0, -2.0])  # replies 0-1: prompt A, 2-3: B, 4-5: C
    centred = centre_by_prompt(scores, 2)
    assert centred.tolist() == [-1.0, 1.0, -1.0, 1.0, 0.0, 0.0]
    # a prompt-wide shift of the reward model's scores changes nothing; one reply's change does
    shifted = scores + torch.tensor([10.0, 10.0, -4.0, -4.0, 0.0, 0.0])
    assert torch.equal(centre_by_prompt(shifted, 2), centred)
    assert not torch.equal(centre_by_prompt(scores + torch.tensor([1.0, 0, 0, 0, 0, 0]), 2), centred)
    assert torch.equal(centre_by_prompt(scores, 1), scores)


def test_ppo_clip_bounds_the_ratio():
    eps = 0.2
    mask = torch.ones(1, 6)
    ratios = torch.tensor([[0.5, 0.79, 1.0, 1.1, 1.21, 3.0]])
    for sign in (1.0, -1.0):
        old = torch.zeros(1, 6)
        logp = ratios.log().clone().requires_grad_(True)
        adv = torch.full((1, 6), sign)
        loss, clip_frac = ppo_policy_loss(logp, old, adv, mask, eps)
        loss.backward()
        grad = logp.grad[0]
        assert clip_frac.item() == pytest.approx(4 / 6)  # 0.5, 0.79, 1.21 and 3.0 lie outside [0.8, 1.2]
        if sign > 0:   # A > 0: no gain from pushing the ratio above 1 + eps
            assert grad[4] == 0 and grad[5] == 0 and (grad[:4] != 0).all()
        else:          # A < 0: no gain from pushing the ratio below 1 - eps
            assert grad[0] == 0 and grad[1] == 0 and (grad[2:] != 0).all()
    # the objective -loss can never exceed (1 + eps) A for A > 0, however large the ratio
    huge = torch.tensor([[100.0]]).log()
    loss, _ = ppo_policy_loss(huge, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), eps)
    assert -loss.item() == pytest.approx(1 + eps)


def test_gae_matches_the_recursion_over_reply_positions():
    rewards = torch.tensor([[9.0, 0.1, 0.2, 1.0, 7.0]])   # positions 0 and 4 are outside the reply
    values = torch.tensor([[5.0, 0.5, 0.4, 0.3, 6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a3 = 1.0 - 0.3
    a2 = 0.2 + 0.9 * 0.3 - 0.4 + 0.9 * 0.8 * a3
    a1 = 0.1 + 0.9 * 0.4 - 0.5 + 0.9 * 0.8 * a2
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0.0]]))
    # gamma = lam = 1 and zero values: the advantage is the reward still to come
    adv, _ = gae(rewards, torch.zeros(1, 5), mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.3, 1.2, 1.0, 0.0]]))


def test_reply_mask_marks_the_logits_that_chose_reply_tokens():
    idx, mask = reply_batch([[7, 8, 9], [7]], [[1, 2], [3, 4, 5]], pad_id=0)
    assert idx.tolist() == [[7, 8, 9, 1, 2], [7, 3, 4, 5, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


# ----------------------------------------------------------------------------- the loops


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    w = make_world(root)
    sft(tiny_sft(w, root, max_steps=150))
    reward(RewardConfig(sft_dir=str(root / "sft"), data_dir=str(w["data"]), out_dir=str(root / "reward"),
                        ckpt_dir=str(root / "rm_ckpt"), sampled_prompts=300, batch_size=32, max_steps=60,
                        lr=2e-3, min_lr=2e-4, warmup_steps=5, eval_interval=60, ckpt_interval=60,
                        log_interval=30, seed=0))
    return {**w, "sft": root / "sft", "reward": root / "reward"}


def tiny_rlhf(world: dict, tmp: Path, **kw) -> RLHFConfig:
    base = dict(sft_dir=str(world["sft"]), reward_dir=str(world["reward"]), data_dir=str(world["data"]),
                out_dir=str(tmp / "rlhf"), ckpt_dir=str(tmp / "ckpt"), max_steps=15, lr=1e-3, min_lr=1e-4,
                warmup_steps=3, max_new_tokens=10, rollout_batch=32, minibatch_size=16, batch_size=32,
                eval_interval=100, ckpt_interval=100, log_interval=5, seed=0)
    base.update(kw)
    return RLHFConfig(**base)


def test_dpo_loss_is_log2_on_real_sequences(world):
    tok = load_tokenizer(world["sft"] / "tokenizer.json")
    model = load_model_folder(world["sft"])
    pairs = encode_pairs(read_jsonl(world["data"] / "pref_val.jsonl")[:8], tok, model.config.block_size)
    loss, _ = dpo_loss(*sequence_logprobs(model, pairs, tok), *sequence_logprobs(model, pairs, tok), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_ppo_raises_the_reward_and_reports_kl_and_clipping(world, tmp_path):
    logged = []
    # plain PPO (no SFT term): the reward model's signal alone moves the policy
    metrics = rlhf(tiny_rlhf(world, tmp_path, algorithm="ppo", ptx_coef=0.0), log=lambda step, m: logged.append(m))
    # the quantity PPO maximises: the reward of replies sampled on (held-out) prompts
    assert metrics["policy_sampled_reward"] > metrics["sft_sampled_reward"] + 0.3, metrics
    assert metrics["kl_to_reference"] > 0
    assert {"reward", "kl", "clip_fraction", "rollout_accuracy"} <= set(logged[-1])
    for key in ("win_rate", "rm_win_rate", "policy_task_accuracy", "sft_task_accuracy", "wins", "losses", "ties"):
        assert key in metrics
    assert metrics["wins"] + metrics["losses"] + metrics["ties"] == metrics["held_out_prompts"]
    assert load_model_folder(tmp_path / "rlhf").config.n_layer == 2


@pytest.mark.parametrize("mix", [dict(nll_weight=0.0, sampled_fraction=0.5), dict(nll_weight=1.0, sampled_fraction=1.0)],
                         ids=["plain-dpo-mixed-pairs", "rpo-own-mistakes"])
def test_dpo_learns_the_held_out_preferences(world, tmp_path, mix):
    metrics = rlhf(tiny_rlhf(world, tmp_path, algorithm="dpo", max_steps=60, beta=0.1, **mix))
    dpo = {k: v for k, v in metrics.items() if k.startswith("dpo_")}
    assert dpo["dpo_val_loss"] < math.log(2) - 0.05, dpo   # log 2 at the start
    assert dpo["dpo_val_reward_accuracy"] > 0.7, dpo      # 0 at the start (all margins 0)
    assert ("dpo_val_loss.rule" in metrics) == (mix["sampled_fraction"] < 1) and "dpo_val_loss.sampled" in metrics


def test_feedback_pairs_are_in_every_dpo_batch():
    rules, sampled, feedback = list(range(50)), list(range(100, 120)), ["f1", "f2", "f3"]
    for step in range(4):
        batch = mixed_batch(rules, sampled, 8, 0.5, 0, step, feedback, 2)
        assert len(batch) == 8 and sum(b in feedback for b in batch) == 2
        assert sum(b in sampled for b in batch) == 3 and sum(b in rules for b in batch) == 3
    # feedback drawn in seeded epochs: 3 pairs, 2 per batch -> each seen twice in 3 steps
    drawn = [b for step in range(3) for b in mixed_batch(rules, [], 8, 0, 0, step, feedback, 2) if b in feedback]
    assert sorted(drawn) == ["f1", "f1", "f2", "f2", "f3", "f3"]
    # no feedback yet: the batch the rule-made and sampled pools alone would give
    assert mixed_batch(rules, sampled, 8, 0.5, 0, 3, [], 2) == mixed_batch(rules, sampled, 8, 0.5, 0, 3)


def test_dpo_learns_the_users_feedback_pairs(world, tmp_path):
    """A few rated replies merged by chat_data (provenance feedback) among ~1000 rule-made pairs: DPO
    learns them (held out: the same conversations, since the point is that these very pairs are used)."""
    data = tmp_path / "chat_data"
    shutil.copytree(world["data"], data)
    system = read_jsonl(data / "pref_val.jsonl")[0]["prompt"][0]
    rated = [("what is your name", "i am the forgeline assistant.", "no."),
             ("say something kind", "you are doing well.", "go away."),
             ("how are you today", "very well, thank you.", "what.")]   # prompts no rule-made pair has
    feedback = [{"task": "feedback", "rule": "better_answer", "answer": None, "provenance": "feedback",
                 "prompt": [system, {"role": "user", "content": q}], "chosen": good, "rejected": bad}
                for q, good, bad in rated]
    write_jsonl(data / "pref_train.jsonl", read_jsonl(data / "pref_train.jsonl") + feedback)
    write_jsonl(data / "pref_val.jsonl", read_jsonl(data / "pref_val.jsonl") + feedback)
    on = rlhf(tiny_rlhf(world, tmp_path / "on", algorithm="dpo", data_dir=str(data), max_steps=30,
                        nll_weight=0.0, sampled_fraction=0.0, feedback_per_batch=4))
    assert on["feedback_pairs_train"] == 3
    assert on["dpo_val_reward_accuracy.feedback"] == 1.0 and on["dpo_val_loss.feedback"] < math.log(2) - 0.1, on
    off = rlhf(tiny_rlhf(world, tmp_path / "off", algorithm="dpo", data_dir=str(data), max_steps=30,
                         nll_weight=0.0, sampled_fraction=0.0, feedback_per_batch=0))
    # without a share of every batch they are 3 among ~1000 rule-made pairs: seen rarely, learned less
    assert off["feedback_pairs_train"] == 3 and off["dpo_val_loss.feedback"] > on["dpo_val_loss.feedback"] + 0.1, off


def disagreeing_reward_dir(world: dict, tmp: Path) -> Path:
    """A copy of the world's reward stage output that disagrees with it: the scalar head negated (the
    opposite preferences for PPO) and each sampled pair's rejected reply swapped for the next pair's (DPO)."""
    out = tmp / "disagreeing_reward"
    shutil.copytree(world["reward"], out)
    weights = load_file(out / "model.safetensors")
    assert {"head.weight", "head.bias"} <= set(weights)
    save_file({k: -v if k.startswith("head.") else v for k, v in weights.items()}, out / "model.safetensors")
    pairs = read_jsonl(out / "sampled_pairs_train.jsonl")
    assert len(pairs) > 1
    write_jsonl(out / "sampled_pairs_train.jsonl",
                [{**p, "rejected": q["rejected"]} for p, q in zip(pairs, pairs[1:] + pairs[:1])])
    return out


@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_the_control_run_ignores_the_reward_signal(world, tmp_path, algorithm):
    """rl_coef=0 trains on the SFT term alone (ptx / the chosen reply's NLL): a reward stage that
    disagrees gives the same policy; with rl_coef=1 it gives another."""
    other = disagreeing_reward_dir(world, tmp_path)
    policies = {}
    for rl_coef in (0.0, 1.0):
        for name, rm in (("same", world["reward"]), ("other", other)):
            cfg = tiny_rlhf(world, tmp_path / f"{rl_coef}-{name}", algorithm=algorithm, max_steps=3, rl_coef=rl_coef,
                            reward_dir=str(rm), eval_samples=1)
            rlhf(cfg)
            policies[rl_coef, name] = load_file(Path(cfg.out_dir) / "model.safetensors")
    gap = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)
    sft = load_file(world["sft"] / "model.safetensors")
    # DPO runs chosen and rejected replies through one padded forward: other rejected replies change
    # the padded width and with it the float rounding, hence a tolerance, far below the other gaps
    assert gap(policies[0.0, "same"], policies[0.0, "other"]) < 1e-5
    assert gap(policies[0.0, "same"], sft) > 1e-3   # it did train
    assert gap(policies[1.0, "same"], policies[1.0, "other"]) > 1e-3


def test_a_control_that_trains_nothing_fails_before_work():
    with pytest.raises(ConfigError, match="would train nothing"):
        RLHFConfig(algorithm="ppo", rl_coef=0.0, ptx_coef=0.0).check()
    with pytest.raises(ConfigError, match="would train nothing"):
        RLHFConfig(algorithm="dpo", rl_coef=0.0, nll_weight=0.0).check()
    RLHFConfig(algorithm="dpo", rl_coef=0.0, ptx_coef=0.0).check()   # nll_weight 1 trains


def test_ppo_exact_resume_after_crash(world, tmp_path):
    full = tiny_rlhf(world, tmp_path / "full", algorithm="ppo", max_steps=4, ckpt_interval=2, log_interval=1)
    rlhf(full)
    crashed = replace(full, out_dir=str(tmp_path / "crash" / "rlhf"), ckpt_dir=str(tmp_path / "crash" / "ckpt"))

    def crash(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rlhf(crashed, log=crash)
    assert latest_checkpoint(crashed.checkpoint_root()).name == "step_00000002"
    rlhf(crashed)  # the sampling RNG, optimizer and value head come back with the weights
    a = load_file(Path(full.out_dir) / "model.safetensors")
    b = load_file(Path(crashed.out_dir) / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- the alignment benchmark


def test_alignment_bench_retrains_a_run_when_the_sft_or_reward_model_changes(tmp_path, monkeypatch):
    import yaml

    import bench.bench_alignment as ba

    def lock(sft_md5: str) -> None:
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"rlhf": {
            "deps": [{"path": "data/sft", "md5": sft_md5}, {"path": "data/reward", "md5": "r1"}],
            "params": {"configs/rlhf.yaml": {"lr": 0.0002}}}}}))

    trained = []

    def fake_run(cmd, cwd, check, env=None):   # the rlhf stage's CLI: writes metrics.json to out_dir
        out = tmp_path / next(a for a in cmd if a.startswith("out_dir="))[len("out_dir="):]
        out.mkdir(parents=True)
        (out / "metrics.json").write_text("{}")
        trained.append(out.name)

    monkeypatch.setattr(ba, "ROOT", tmp_path)
    monkeypatch.setattr(ba.subprocess, "run", fake_run)
    (tmp_path / "data").mkdir()
    lock("s1")
    first = ba.train("dpo", ba.RUNS["dpo"], ba.stage_state())
    assert ba.train("dpo", ba.RUNS["dpo"], ba.stage_state()) == first and len(trained) == 1   # up to date: reused
    ba.train("dpo_control", ba.RUNS["dpo_control"], ba.stage_state())
    lock("s2")                                                                                  # a new SFT model
    second = ba.train("dpo", ba.RUNS["dpo"], ba.stage_state())
    assert second != first and trained[-1] == second.name and not first.exists()               # retrained, stale gone
    assert (tmp_path / "data" / trained[1]).exists()             # another run's folder is not "dpo"'s stale one


def test_alignment_bench_runs_plain_ppo_at_the_lr_the_config_gives_it():
    import bench.bench_alignment as ba

    lr_line = next(line for line in (ROOT / "configs/rlhf.yaml").read_text().splitlines() if line.startswith("lr:"))
    assert f"ptx_coef=0) wants lr={ba.PLAIN_PPO_LR}" in lr_line
    assert f"lr={ba.PLAIN_PPO_LR}" in ba.RUNS["ppo_plain"] and "ptx_coef=0" in ba.RUNS["ppo_plain"]
