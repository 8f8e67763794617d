"""RLHF: improve the SFT model with PPO against the reward model, or with DPO on the preference pairs.

`algorithm` in configs/rlhf.yaml picks the loop; both start the policy from the SFT model and
keep a frozen copy of it as the reference.

- PPO (Schulman et al. 2017, arXiv:1707.06347; as used by Ziegler et al. 2019, arXiv:1909.08593,
  and Ouyang et al. 2022, arXiv:2203.02155): each step samples replies to a batch of training
  prompts, scores each finished reply with the reward model, and gives every reply token the
  reward -kl_coef * (log pi - log pi_ref) (the KL penalty), plus the score on the last token.
  Each prompt is answered replies_per_prompt times and a reply's score is taken relative to the
  mean of its prompt's replies: the reward model is trained on pairs, so only its ranking of
  replies to one prompt means anything (its level varies from prompt to prompt, and without the
  centring the advantages mostly said which prompts score high; the policy drifted).
  A value head on the policy's (detached) hidden states gives GAE advantages (Schulman et al.
  2016, arXiv:1506.02438), whitened per batch; then ppo_epochs passes of minibatches minimise
  the clipped surrogate max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi / pi_old, plus a clipped
  value loss. Logged per step: mean reward, KL, clip fraction, and the rollouts' ground-truth
  accuracy. ptx_coef > 0 adds the SFT loss on a batch of SFT conversations to every update
  (InstructGPT's PPO-ptx, with the SFT mix standing in for the pretraining data): without it PPO
  ran up the reward model's score while held-out accuracy fell (README, Alignment).
- DPO (Rafailov et al. 2023, arXiv:2305.18290): on (prompt, chosen, rejected) pairs, minimise
  -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), sequence log-probs
  summed over the reply tokens. A batch mixes data/chat_data's rule-made pairs with the reward
  stage's `sampled_mistake` pairs (the SFT model's own wrong replies; `sampled_fraction`).
  nll_weight > 0 adds the chosen reply's NLL (RPO, Pang et al. 2024, arXiv:2404.19733); 0 is
  plain DPO. The defaults (own mistakes only, nll_weight 1) are what raised held-out accuracy
  here; plain DPO on the rule-made pairs learned the preferences (80% held-out margin accuracy)
  while its greedy accuracy fell (README, Alignment).

rl_coef scales PPO's surrogate (with its KL penalty) or the DPO loss; rl_coef=0 leaves only the
SFT term (ptx_coef, nll_weight) on the same batches and schedule: the control that tells how much
of a gain the reward model or the preferences bring, and how much the extra supervised steps.

Both end with the same held-out evaluation on the verifiable val prompts, greedy replies:
exact-match accuracy of the policy and of the SFT model, the win rate of the policy against
the SFT model judged by the ground truth (a prompt is a win when only the policy is right, a
loss when only the SFT model is right, a tie otherwise; win_rate = (wins + ties/2) / prompts,
decisive_win_rate = wins / (wins + losses)), the same win rate judged by the reward model (so
reward hacking shows as a gap between the two), the mean reward of the greedy replies and of
replies sampled at temperature 1, and the KL of the policy to the reference (mean over held-out
prompts of the summed log-ratio of sampled replies). On eval_samples replies per prompt sampled
at temperature 1 (both models seeded alike): each model's sampled accuracy and the paired
sampled win rate by the ground truth.

    python -m tasks.rlhf [algorithm=ppo|dpo] [key=value ...]
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from prefect import task

from forgeline.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from forgeline.config import ConfigError, config_dict, load_config
from forgeline.workspace import run_stage
from models.gpt import GPT
from models.reward_model import PolicyWithValue, RewardModel
from tasks.chat_data import END, PAD, VERIFIABLE, decode_reply, encode_chat, is_correct, load_tokenizer, read_jsonl
from tasks.pretrain import lr_at
from tasks.reward import collate_sequences, encode_pairs, load_reward_model, mixed_batch
from tasks.sft import assistant_loss, batch_indices, collate, encode_conversations, file_sha256, generate, prompt_ids


@dataclass
class RLHFConfig:
    algorithm: Literal["ppo", "dpo"] = "ppo"
    sft_dir: str = "data/sft"             # the policy's start and the frozen reference
    reward_dir: str = "data/reward"       # the reward model (PPO's rewards; scored in every evaluation)
    data_dir: str = "data/chat_data"      # sft_train.jsonl (PPO prompts), pref_train.jsonl (DPO), *_val
    out_dir: str = "data/rlhf"            # the policy's model folder + metrics.json
    ckpt_dir: str = "checkpoints/rlhf"
    # optimisation, both algorithms
    max_steps: int = 200                  # PPO: rollouts; DPO: batches of pairs
    lr: float = 2e-4
    min_lr: float = 5e-6
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_new_tokens: int = 16              # reply length cap, sampling and evaluation
    rl_coef: float = 1.0                  # weight of PPO's surrogate (KL penalty included) / of the DPO loss;
                                          # 0 keeps only ptx_coef's / nll_weight's SFT term: the control run
                                          # that tells what the reward model / the preferences add
    # PPO
    rollout_batch: int = 64               # replies sampled per step
    replies_per_prompt: int = 4           # rollout_batch / this prompts per step, each answered this often;
                                          # > 1: a reply's score counts relative to its prompt's mean
    minibatch_size: int = 32              # rollouts per optimizer step
    ppo_epochs: int = 2                   # passes over each rollout batch
    temperature: float = 1.0              # sampling temperature of the rollouts
    kl_coef: float = 0.2                  # per-token KL penalty weight
    clip_eps: float = 0.2                 # ratio clip of the surrogate objective
    value_lr: float = 3e-3                # peak learning rate of the value head (a linear probe: it must
                                          # learn each prompt's expected reward within a few rollouts)
    value_clip: float = 1.0               # clip of the value update around the rollout's values
    vf_coef: float = 0.5
    gamma: float = 1.0
    gae_lambda: float = 0.95
    missing_end_penalty: float = 1.0      # subtracted from the score of a reply with no <|end|>
    ptx_coef: float = 1.0                 # + this * the SFT loss on a batch of SFT conversations in every
                                          # update (InstructGPT's PPO-ptx, SFT data for the pretraining mix)
    # DPO
    beta: float = 0.1                     # strength of the implicit KL constraint
    nll_weight: float = 1.0               # + this * NLL per token of the chosen reply (RPO; 0 = plain DPO)
    sampled_fraction: float = 1.0         # share of each DPO batch from the reward stage's sampled_mistake
                                          # pairs (the SFT model's own errors); 0 = rule-made pairs only
    batch_size: int = 32                  # pairs per step
    # bookkeeping
    eval_samples: int = 4                 # replies sampled per held-out prompt for the sampled win rate
    eval_interval: int = 50               # steps between held-out accuracies
    ckpt_interval: int = 50
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 1337

    def check(self) -> None:
        for name in ("max_steps", "rollout_batch", "minibatch_size", "ppo_epochs", "batch_size",
                     "eval_interval", "ckpt_interval", "log_interval", "max_new_tokens", "eval_samples",
                     "replies_per_prompt"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rlhf: {name} must be >= 1")
        if self.rollout_batch % self.minibatch_size or self.rollout_batch % self.replies_per_prompt:
            raise ConfigError("rlhf: rollout_batch must be a multiple of minibatch_size and of replies_per_prompt")
        if not 0 <= self.min_lr <= self.lr or min(self.value_lr, self.beta, self.temperature) <= 0 \
                or not 0 < self.clip_eps < 1 or not 0 <= self.sampled_fraction <= 1 \
                or min(self.ptx_coef, self.rl_coef) < 0:
            raise ConfigError("rlhf: need 0 <= min_lr <= lr, value_lr, beta, temperature > 0, 0 < clip_eps < 1, "
                              "0 <= sampled_fraction <= 1, ptx_coef, rl_coef >= 0")
        if self.rl_coef == 0 and (self.ptx_coef if self.algorithm == "ppo" else self.nll_weight) == 0:
            raise ConfigError(f"rlhf: rl_coef 0 with {'ptx_coef' if self.algorithm == 'ppo' else 'nll_weight'} 0 "
                              "would train nothing")

    def checkpoint_root(self) -> Path:
        """ckpt_dir/<algorithm>-<key>: the key hashes the settings, the SFT and reward weights and the data."""
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "eval_interval", "eval_samples"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for path in (Path(self.sft_dir) / "model.safetensors", Path(self.reward_dir) / "model.safetensors",
                     Path(self.reward_dir) / "sampled_pairs_train.jsonl",
                     Path(self.data_dir) / "sft_train.jsonl", Path(self.data_dir) / "pref_train.jsonl"):
            h.update(file_sha256(path).encode())
        return Path(self.ckpt_dir) / f"{self.algorithm}-{h.hexdigest()[:12]}"


# ----------------------------------------------------------------------------- losses


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss over masked tokens: mean max(-A r, -A clip(r, 1-eps, 1+eps)).

    Returns (loss, clip fraction: share of tokens whose ratio r lies outside [1-eps, 1+eps]). Once r
    leaves that band in the direction A favours, the clipped term is the larger one and constant,
    so the gradient is zero: one rollout cannot pull the policy further than the band.
    """
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    clip_frac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)
    return masked_mean(loss, mask), clip_frac


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over the masked (reply) positions of (B, T) tensors.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, where the next position
    counts only if it is a reply position (after the last reply token the episode ends: V = 0).
    """
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(rewards.size(0))
    next_value = torch.zeros(rewards.size(0))
    next_mask = torch.zeros(rewards.size(0))
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        adv[:, t] = delta + gamma * lam * next_adv * next_mask
        next_adv, next_value, next_mask = adv[:, t], values[:, t], mask[:, t]
    adv = adv * mask
    return adv, (adv + values) * mask


def centre_by_prompt(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Scores (B,) of k consecutive replies per prompt, less their prompt's mean (k = 1: unchanged)."""
    return scores - scores.view(-1, k).mean(1).repeat_interleave(k) if k > 1 else scores


def dpo_loss(pol_chosen: torch.Tensor, pol_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), mean over pairs; also the
    implicit reward margins beta * (...) (B,). Identical policy and reference give log 2."""
    margins = beta * ((pol_chosen - ref_chosen) - (pol_rejected - ref_rejected))
    return -F.logsigmoid(margins).mean(), margins.detach()


# ----------------------------------------------------------------------------- sequences


def reply_batch(prompts: list[list[int]], replies: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + reply rows, right-padded (B, T); and the action mask (B, T-1): 1 at t when token t+1
    is a reply token (the logits at t chose it)."""
    seqs = [p + r for p, r in zip(prompts, replies)]
    idx, _ = collate_sequences(seqs, pad_id)
    mask = torch.zeros(len(seqs), idx.size(1) - 1)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        mask[i, len(p) - 1:len(p) - 1 + len(r)] = 1
    return idx, mask


def reply_logprobs(gpt: GPT, idx: torch.Tensor, mask: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """log p(idx[:, t+1] | idx[:, :t+1]) where mask (B, T-1) is 1, 0 elsewhere -> (B, T-1), fp32.

    The LM head and the softmax run on the masked positions alone (a reply is a few of a row's
    ~45 tokens, and the head is ~40% of `tiny`'s FLOPs). h: gpt.hidden(idx), if already computed.
    """
    keep = mask.bool()
    h = gpt.hidden(idx) if h is None else h
    logits = gpt.lm_head(h[:, :-1][keep]).float()                      # (N, V), N = masked positions
    lp = torch.log_softmax(logits, dim=-1).gather(-1, idx[:, 1:][keep][:, None]).squeeze(-1)
    return torch.zeros(mask.shape, dtype=lp.dtype).masked_scatter(keep, lp)


@torch.no_grad()
def reward_scores(rm: RewardModel, prompts: list[list[int]], replies: list[list[int]], end_id: int,
                  pad_id: int, missing_end_penalty: float, batch_size: int = 128) -> torch.Tensor:
    """The reward model's score of each prompt + reply + <|end|> (appended where the reply lacks it),
    less missing_end_penalty for such replies. (B,)"""
    out = []
    for b in range(0, len(prompts), batch_size):
        seqs = [p + (r if r[-1:] == [end_id] else r + [end_id])
                for p, r in zip(prompts[b:b + batch_size], replies[b:b + batch_size])]
        idx, last = collate_sequences(seqs, pad_id)
        scores = rm(idx, last)
        unfinished = torch.tensor([float(r[-1:] != [end_id]) for r in replies[b:b + batch_size]])
        out.append(scores - missing_end_penalty * unfinished)
    return torch.cat(out)


# ----------------------------------------------------------------------------- PPO step


def ppo_step(ac: PolicyWithValue, ref: GPT, rm: RewardModel, optimizer, prompts: list[list[int]],
             rows: list[dict], tok, cfg: RLHFConfig, ptx_batches=None) -> dict:
    """One rollout batch: sample, score, advantages, then ppo_epochs of clipped updates. Returns metrics.
    ptx_batches: an iterator of (x, y) SFT batches, one per update (with cfg.ptx_coef > 0)."""
    end_id, pad_id = tok.token_to_id(END), tok.token_to_id(PAD)
    # ---- rollout: sample replies, score them, and fix the old log-probs, reference log-probs, values
    replies = generate(ac.gpt, prompts, cfg.max_new_tokens, end_id, temperature=cfg.temperature)
    replies = [r if r else [end_id] for r in replies]
    idx, mask = reply_batch(prompts, replies, pad_id)
    with torch.no_grad():
        ac.eval()
        h, values = ac(idx)
        old_logp, values = reply_logprobs(ac.gpt, idx, mask, h), values[:, :-1] * mask
        ref_logp = reply_logprobs(ref, idx, mask)
        scores = reward_scores(rm, prompts, replies, end_id, pad_id, cfg.missing_end_penalty)
        ac.train()
    # a pairwise-trained reward model ranks replies to one prompt; its level across prompts is
    # arbitrary (the loss ignores a per-prompt shift), so each reply is scored against its siblings
    centred = centre_by_prompt(scores, cfg.replies_per_prompt)
    kl = (old_logp - ref_logp) * mask                      # per-token log-ratio, (B, T-1)
    rewards = -cfg.kl_coef * kl
    last = mask.cumsum(1).argmax(1)                        # the last reply position of each row
    rewards[torch.arange(len(prompts)), last] += centred
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
    mu, sigma = masked_mean(adv, mask), masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt()
    adv = (adv - mu) / (sigma + 1e-8) * mask               # whitened over the batch's reply tokens

    # ---- updates: ppo_epochs passes of minibatches, the minibatch order seeded by torch's RNG
    stats = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "grad_norm": [], "ptx_loss": []}
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(prompts)).split(cfg.minibatch_size):
            m = mask[mb]
            h, new_values = ac(idx[mb])
            logp = reply_logprobs(ac.gpt, idx[mb], m, h)
            pg_loss, clip_frac = ppo_policy_loss(logp, old_logp[mb], adv[mb], m, cfg.clip_eps)
            v = new_values[:, :-1]
            v_clipped = values[mb] + (v - values[mb]).clamp(-cfg.value_clip, cfg.value_clip)
            vf_loss = 0.5 * masked_mean(torch.maximum((v - returns[mb]) ** 2, (v_clipped - returns[mb]) ** 2), m)
            loss = cfg.rl_coef * pg_loss + cfg.vf_coef * vf_loss
            ptx_loss = torch.zeros(())
            if cfg.ptx_coef:
                ptx_loss = assistant_loss(ac.gpt, *next(ptx_batches))
                loss = loss + cfg.ptx_coef * ptx_loss
            loss.backward()
            # the policy's norm alone: the value head's gradient (squared reward units) must not scale it
            grad_norm = torch.nn.utils.clip_grad_norm_(ac.gpt.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
                raise FloatingPointError("rlhf: non-finite PPO loss or grad norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, val in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_fraction", clip_frac),
                           ("grad_norm", grad_norm), ("ptx_loss", ptx_loss)):
                stats[k].append(val.detach().item())

    texts = [decode_reply(tok, r)[0] for r in replies]
    return {"reward": scores.mean().item(), "kl": kl.sum(1).mean().item(),
            "rollout_accuracy": sum(is_correct(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows),
            "reply_tokens": mask.sum(1).mean().item(),
            "unfinished": sum(r[-1] != end_id for r in replies) / len(replies),
            **{k: sum(v) / len(v) for k, v in stats.items()}}


# ----------------------------------------------------------------------------- DPO step


def sequence_logprobs(model: GPT, pairs: list, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-probs (reply tokens and <|end|>) of the chosen and the rejected sequences of
    (chosen ids, rejected ids, row) pairs, (B,) each, in one forward."""
    prompt_lens = [len(encode_chat(tok, p[2]["prompt"], add_generation_prompt=True)[0]) for p in pairs] * 2
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]
    idx, _ = collate_sequences(seqs, tok.token_to_id(PAD))
    mask = torch.zeros(len(seqs), idx.size(1) - 1)
    for i, (n, s) in enumerate(zip(prompt_lens, seqs)):
        mask[i, n - 1:len(s) - 1] = 1
    logp = reply_logprobs(model, idx, mask).sum(1)
    return logp[:len(pairs)], logp[len(pairs):]


def dpo_step(policy: GPT, ref: GPT, optimizer, pairs: list, tok, cfg: RLHFConfig) -> dict:
    with torch.no_grad():
        ref_c, ref_r = sequence_logprobs(ref, pairs, tok)
    pol_c, pol_r = sequence_logprobs(policy, pairs, tok)
    loss, margins = dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta)
    loss = cfg.rl_coef * loss
    if cfg.nll_weight:
        # Pang et al. 2024 (arXiv:2404.19733): DPO alone may lower the chosen reply's likelihood too
        reply_tokens = torch.tensor([len(p[0]) - len(encode_chat(tok, p[2]["prompt"], add_generation_prompt=True)[0])
                                     for p in pairs])
        loss = loss + cfg.nll_weight * (-pol_c / reply_tokens).mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
        raise FloatingPointError("rlhf: non-finite DPO loss or grad norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "reward_accuracy": (margins > 0).float().mean().item(),
            "margin": margins.mean().item(), "chosen_logratio": (pol_c - ref_c).mean().item(),
            "rejected_logratio": (pol_r - ref_r).mean().item(), "grad_norm": float(grad_norm)}


@torch.no_grad()
def dpo_held_out(policy: GPT, ref: GPT, pairs: list, tok, beta: float, batch_size: int = 64) -> dict:
    """DPO loss and implicit-reward accuracy (share of margins > 0) on held-out pairs; log 2 and 0 at the start."""
    losses, margins = [], []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        loss, m = dpo_loss(*sequence_logprobs(policy, chunk, tok), *sequence_logprobs(ref, chunk, tok), beta)
        losses.append(loss.item() * len(chunk))
        margins.append(m)
    margins = torch.cat(margins)
    return {"dpo_val_loss": sum(losses) / len(pairs), "dpo_val_reward_accuracy": (margins > 0).float().mean().item()}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_policy(policy: GPT, sft_model: GPT, ref: GPT, rm: RewardModel, tok, rows: list[dict],
                    cfg: RLHFConfig) -> tuple[dict, list[dict]]:
    """Held-out metrics of the policy against the SFT model (greedy replies); also per-prompt samples."""
    end_id, pad_id = tok.token_to_id(END), tok.token_to_id(PAD)
    prompts = [prompt_ids(tok, r) for r in rows]
    out, replies = {}, {}
    for name, model in (("policy", policy), ("sft", sft_model)):
        gens = [g if g else [end_id] for g in generate(model, prompts, cfg.max_new_tokens, end_id)]
        texts = [decode_reply(tok, g)[0] for g in gens]
        correct = torch.tensor([is_correct(t, r["answer"]) for t, r in zip(texts, rows)])
        scores = reward_scores(rm, prompts, gens, end_id, pad_id, cfg.missing_end_penalty)
        replies[name] = (texts, correct, scores)
        out[f"{name}_task_accuracy"] = correct.float().mean().item()
        out[f"{name}_mean_reward"] = scores.mean().item()
        for t in VERIFIABLE:
            sel = torch.tensor([r["source"] == t for r in rows])
            if sel.any():
                out[f"{name}_task_accuracy.{t}"] = correct[sel].float().mean().item()
    (pt, pc, ps), (st, sc, ss) = replies["policy"], replies["sft"]
    wins, losses = int((pc & ~sc).sum()), int((~pc & sc).sum())
    n = len(rows)
    out.update({"wins": wins, "losses": losses, "ties": n - wins - losses,
                "win_rate": (wins + (n - wins - losses) / 2) / n,
                "decisive_win_rate": wins / (wins + losses) if wins + losses else 0.5,
                "rm_win_rate": ((ps > ss).float().sum() + 0.5 * (ps == ss).float().sum()).item() / n})
    # on eval_samples replies per prompt sampled at temperature 1 (the distribution PPO optimises and
    # DPO reshapes): each model's sampled accuracy, the paired win rate by the ground truth (the
    # policy's j-th sample against the SFT model's j-th), the mean reward, and KL(policy || reference)
    # as the summed log-ratio of the policy's samples
    k = cfg.eval_samples
    many = [p for p in prompts for _ in range(k)]
    answers = [r["answer"] for r in rows for _ in range(k)]
    sampled_correct = {}
    for name, model in (("policy", policy), ("sft", sft_model)):
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed + 1)
            sampled = [g if g else [end_id]
                       for g in generate(model, many, cfg.max_new_tokens, end_id, temperature=1.0)]
        scores = reward_scores(rm, many, sampled, end_id, pad_id, cfg.missing_end_penalty)
        correct = torch.tensor([is_correct(decode_reply(tok, g)[0], a) for g, a in zip(sampled, answers)])
        sampled_correct[name] = correct
        out[f"{name}_sampled_reward"] = scores.mean().item()
        out[f"{name}_sampled_accuracy"] = correct.float().mean().item()
        for t in VERIFIABLE:
            sel = torch.tensor([r["source"] == t for r in rows for _ in range(k)])
            if sel.any():
                out[f"{name}_sampled_accuracy.{t}"] = correct[sel].float().mean().item()
        if name == "policy":
            kls = []
            for b in range(0, len(many), 256):
                idx, mask = reply_batch(many[b:b + 256], sampled[b:b + 256], pad_id)
                kls.append((reply_logprobs(policy, idx, mask) - reply_logprobs(ref, idx, mask)).sum(1))
            out["kl_to_reference"] = torch.cat(kls).mean().item()
    pc_s, sc_s = sampled_correct["policy"], sampled_correct["sft"]
    s_wins, s_losses, m = int((pc_s & ~sc_s).sum()), int((~pc_s & sc_s).sum()), len(many)
    out.update({"sampled_wins": s_wins, "sampled_losses": s_losses, "sampled_ties": m - s_wins - s_losses,
                "sampled_win_rate": (s_wins + (m - s_wins - s_losses) / 2) / m})
    samples = [{"task": r["source"], "prompt": r["messages"][-2]["content"], "answer": r["answer"],
                "policy": pt[i], "policy_correct": bool(pc[i]), "policy_reward": float(ps[i]),
                "sft": st[i], "sft_correct": bool(sc[i]), "sft_reward": float(ss[i])} for i, r in enumerate(rows)]
    return out, samples


@torch.no_grad()
def held_out_accuracy(policy: GPT, tok, rows: list[dict], cfg: RLHFConfig) -> float:
    end_id = tok.token_to_id(END)
    gens = generate(policy, [prompt_ids(tok, r) for r in rows], cfg.max_new_tokens, end_id)
    return sum(is_correct(decode_reply(tok, g)[0], r["answer"]) for g, r in zip(gens, rows)) / len(rows)


# ----------------------------------------------------------------------------- the loop


def dpo_rows(cfg: RLHFConfig, split: str) -> tuple[list[dict], list[dict]]:
    """DPO's preference pairs: the rule-made ones and (if sampled_fraction > 0) the SFT model's sampled mistakes."""
    sampled = read_jsonl(Path(cfg.reward_dir) / f"sampled_pairs_{split}.jsonl") if cfg.sampled_fraction else []
    return read_jsonl(Path(cfg.data_dir) / f"pref_{split}.jsonl"), sampled


def rlhf(cfg: RLHFConfig, log=None) -> dict:
    """Run (or resume) cfg.algorithm to cfg.max_steps; write the policy to cfg.out_dir; return metrics."""
    from tasks.pretrain import load_pretrained

    torch.manual_seed(cfg.seed)
    sft_model = load_pretrained(cfg.sft_dir)
    ref = load_pretrained(cfg.sft_dir).requires_grad_(False)   # frozen: the KL anchor
    rm = load_reward_model(cfg.reward_dir).requires_grad_(False)
    tok = load_tokenizer(Path(cfg.sft_dir) / "tokenizer.json")
    policy = copy.deepcopy(sft_model).train()
    # PPO trains the policy and its value head together (the head at its own learning rate); DPO the policy alone
    model = PolicyWithValue(policy) if cfg.algorithm == "ppo" else policy
    params = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    if cfg.algorithm == "ppo":
        groups.append({"params": list(model.value_head.parameters()), "weight_decay": 0.0,
                       "lr_scale": cfg.value_lr / cfg.lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    val_rows = [r for r in read_jsonl(Path(cfg.data_dir) / "sft_val.jsonl") if r["answer"] is not None]
    if cfg.algorithm == "ppo":
        sft_rows = read_jsonl(Path(cfg.data_dir) / "sft_train.jsonl")
        train_rows = [r for r in sft_rows if r["answer"] is not None]
        train_prompts = [prompt_ids(tok, r) for r in train_rows]
        # PPO-ptx: one SFT batch per update, ppo_epochs * rollout_batch / minibatch_size updates a step
        conversations = encode_conversations(sft_rows, tok, policy.config.block_size)[0] if cfg.ptx_coef else []
        updates = cfg.ppo_epochs * cfg.rollout_batch // cfg.minibatch_size
    else:
        rule_pairs, sampled_pairs = (encode_pairs(rows, tok, policy.config.block_size)
                                     for rows in dpo_rows(cfg, "train"))

    # ---- resume from the newest complete checkpoint, if any
    step, history = 0, {"train": [], "val": []}
    ckpt_root = cfg.checkpoint_root()
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is not None:
        state, meta = load_checkpoint(ckpt, model)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step, history = meta["step"], meta["history"]
        print(f"rlhf: resumed from {ckpt} at step {step}", flush=True)
    resumed_at = step if ckpt is not None else -1

    t_start, t_last, last_step = time.perf_counter(), time.perf_counter(), step
    while step < cfg.max_steps:
        # ---- learning rate
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

        # ---- eval and checkpoint (state before this step's update)
        if step > 0 and step != resumed_at and step % cfg.eval_interval == 0:
            history["val"].append([step, held_out_accuracy(policy, tok, val_rows, cfg)])
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save(ckpt_root, cfg, model, optimizer, step, history)

        # ---- one step: a PPO rollout batch and its updates, or a DPO batch of pairs
        if cfg.algorithm == "ppo":
            k = cfg.replies_per_prompt
            rows = [i for i in batch_indices(len(train_prompts), cfg.rollout_batch // k, cfg.seed, step)
                    for _ in range(k)]
            ptx = (collate([conversations[i] for i in batch_indices(len(conversations), cfg.minibatch_size,
                                                                    cfg.seed, step * updates + j)],
                           tok.token_to_id(PAD)) for j in range(updates)) if cfg.ptx_coef else None
            metrics = ppo_step(model, ref, rm, optimizer, [train_prompts[i] for i in rows],
                               [train_rows[i] for i in rows], tok, cfg, ptx)
        else:
            batch = mixed_batch(rule_pairs, sampled_pairs, cfg.batch_size, cfg.sampled_fraction, cfg.seed, step)
            metrics = dpo_step(policy, ref, optimizer, batch, tok, cfg)
        step += 1
        history["train"].append([step, metrics])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            dt = (now - t_last) / max(1, step - last_step)
            t_last, last_step = now, step
            shown = ("reward", "kl", "clip_fraction", "rollout_accuracy") if cfg.algorithm == "ppo" else \
                ("loss", "reward_accuracy", "margin", "chosen_logratio")
            print(f"step {step:>4}/{cfg.max_steps} " + " ".join(f"{k} {metrics[k]:.4f}" for k in shown)
                  + f" lr {lr:.2e} {dt:.2f} s/step", flush=True)
            if log:
                log(step, {**metrics, "lr": lr})

    # ---- final checkpoint, held-out evaluation and model
    if step != resumed_at:
        save(ckpt_root, cfg, model, optimizer, step, history)
    train_seconds = time.perf_counter() - t_start
    policy.eval()
    evaluated, samples = evaluate_policy(policy, sft_model, ref, rm, tok, val_rows, cfg)
    if cfg.algorithm == "dpo":
        # held-out pairs of the kinds training drew: rule-made unless sampled_fraction == 1, the
        # sampled mistakes if sampled_fraction > 0; each kind also on its own
        rule_val, sampled_val = dpo_rows(cfg, "val")
        kinds = {"rule": rule_val if cfg.sampled_fraction < 1 else [], "sampled": sampled_val}
        for kind, rows in kinds.items():
            if rows:
                found = dpo_held_out(policy, ref, encode_pairs(rows, tok, policy.config.block_size), tok, cfg.beta)
                evaluated.update({f"{k}.{kind}": v for k, v in found.items()})
        evaluated.update(dpo_held_out(policy, ref, encode_pairs(sum(kinds.values(), []), tok, policy.config.block_size),
                                      tok, cfg.beta))
    metrics = {"algorithm": cfg.algorithm, "steps": step, **evaluated, "held_out_prompts": len(val_rows),
               "train_seconds": train_seconds}
    write_model(cfg, policy, metrics, history, samples)
    return metrics


def save(root: Path, cfg: RLHFConfig, model, optimizer, step: int, history: dict) -> None:
    position = {"step": step, ("prompts_seen" if cfg.algorithm == "ppo" else "pairs_seen"):
                step * (cfg.rollout_batch if cfg.algorithm == "ppo" else cfg.batch_size)}
    gpt = model.gpt if isinstance(model, PolicyWithValue) else model
    save_checkpoint(root, step, model, {"optimizer": optimizer.state_dict(), "rng": rng_state()},
                    {"data_position": position, "history": history, "model_config": asdict(gpt.config),
                     "train_config": asdict(cfg)}, keep=cfg.keep_checkpoints)


def write_model(cfg: RLHFConfig, policy: GPT, metrics: dict, history: dict, samples: list[dict]) -> None:
    """data/rlhf/: the policy as a model folder (as data/sft), metrics.json, history.json, samples.json."""
    from safetensors.torch import save_model

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(policy, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(policy.config), indent=2))
    shutil.copy2(Path(cfg.sft_dir) / "tokenizer.json", out / "tokenizer.json")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    (out / "samples.json").write_text(json.dumps(samples, indent=1))


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    cfg = load_config(RLHFConfig, "rlhf", sys.argv[1:] if argv is None else argv)
    with stage_run("rlhf", config_dict(cfg)):
        mlflow.set_tag("rlhf.algorithm", cfg.algorithm)
        mlflow.set_tag("rlhf.control", str(cfg.rl_coef == 0).lower())   # true: the SFT term alone
        metrics = rlhf(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "algorithm"})
        out = Path(cfg.out_dir)
        mlflow.log_artifact(str(out / "samples.json"))
        for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json"):
            mlflow.log_artifact(str(out / name), artifact_path="model")  # what the registry versions
    print(f"rlhf ({cfg.algorithm}): held-out accuracy {metrics['sft_task_accuracy']:.3f} (SFT) -> "
          f"{metrics['policy_task_accuracy']:.3f}; win rate vs SFT {metrics['win_rate']:.3f} by ground truth "
          f"({metrics['wins']} wins, {metrics['losses']} losses, {metrics['ties']} ties), "
          f"{metrics['rm_win_rate']:.3f} by the reward model; KL to reference {metrics['kl_to_reference']:.3f}")


@task(name="rlhf", retries=1, retry_delay_seconds=10)
def rlhf_task(run: dict[str, str]) -> dict:
    return run_stage("rlhf", **run)


if __name__ == "__main__":
    main()
