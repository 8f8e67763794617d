"""PPO against the reward model, from the SFT model (its config and its loop; tasks/rlhf/ dispatches here).

PPO (Schulman et al. 2017, arXiv:1707.06347; as used by Ziegler et al. 2019, arXiv:1909.08593, and
Ouyang et al. 2022, arXiv:2203.02155): each step samples replies to a batch of training prompts,
scores each finished reply with the reward model, and gives every reply token the reward
-kl_coef * (log pi - log pi_ref) (the KL penalty), plus the score on the last token. Each prompt is
answered replies_per_prompt times and a reply's score is taken relative to the mean of its prompt's
replies: the reward model is trained on pairs, so only its ranking of replies to one prompt means
anything (its level varies from prompt to prompt). A value head on the policy's (detached) hidden
states gives GAE advantages (Schulman et al. 2016, arXiv:1506.02438), whitened per batch; then
ppo_epochs passes of minibatches minimise the clipped surrogate max(-A r, -A clip(r, 1-eps, 1+eps)),
r = pi / pi_old, plus a clipped value loss. ptx_coef > 0 adds the SFT loss on a batch of SFT
conversations to every update (InstructGPT's PPO-ptx, with the SFT mix standing in for the
pretraining data); why it is on by default: README, Alignment. rl_coef=0 leaves the SFT term alone
on the same batches and schedule: the control run. Logged per step: mean reward, KL, clip
fraction, and the rollouts' ground-truth accuracy.

    python -m tasks.rlhf algorithm=ppo [key=value ...]
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from forgeline.chat import (END, PAD, collate, decode_reply, encode_conversations, is_correct, load_tokenizer,
                            prompt_ids, read_jsonl)
from forgeline.checkpoint import checkpoint_key, load_model_folder, resume_training_state, save_training_state
from forgeline.config import ConfigError
from forgeline.schedule import warmup_cosine
from models.gpt import GPT, linear_cross_entropy
from models.reward_model import PolicyWithValue, RewardModel
from models.sampling import GenerationConfig, generate
from tasks.rlhf.common import (DECODE_BATCH, AlignmentConfig, batch_indices, evaluate_policy, held_out_accuracy,
                               optimizer_for, reply_batch, reply_logprobs, reward_scores, write_policy)


@dataclass
class PPOConfig(AlignmentConfig):
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
    ptx_coef: float = 1.0                 # + this * the SFT loss on a batch of SFT conversations in every
                                          # update (InstructGPT's PPO-ptx, SFT data for the pretraining mix)

    def check(self) -> None:
        self.check_shared("ppo")
        for name in ("rollout_batch", "minibatch_size", "ppo_epochs", "replies_per_prompt"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo: {name} must be >= 1")
        if self.rollout_batch % self.minibatch_size or self.rollout_batch % self.replies_per_prompt:
            raise ConfigError("ppo: rollout_batch must be a multiple of minibatch_size and of replies_per_prompt")
        if min(self.value_lr, self.temperature) <= 0 or not 0 < self.clip_eps < 1 or self.ptx_coef < 0:
            raise ConfigError("ppo: need value_lr, temperature > 0, 0 < clip_eps < 1, ptx_coef >= 0")
        if self.rl_coef == 0 and self.ptx_coef == 0:
            raise ConfigError("ppo: rl_coef 0 with ptx_coef 0 would train nothing")

    def checkpoint_root(self) -> Path:
        """ckpt_dir/ppo-<key>: the key hashes the settings, the SFT and reward weights and the prompts."""
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "eval_interval", "eval_samples"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        inputs = [Path(self.sft_dir) / "model.safetensors", Path(self.reward_dir) / "model.safetensors",
                  Path(self.data_dir) / "sft_train.jsonl"]
        return Path(self.ckpt_dir) / f"ppo-{checkpoint_key(settings, inputs)}"


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


def assistant_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PPO-ptx's SFT term, as tasks/sft.py computes it (copied: each loop owns its loss): mean
    cross-entropy over targets that are not -100, the LM head run on those positions alone."""
    keep = y != -100
    return linear_cross_entropy(model.hidden(x)[keep], model.lm_head.weight, y[keep])


# ----------------------------------------------------------------------------- one step


def ppo_step(ac: PolicyWithValue, ref: GPT, rm: RewardModel, optimizer, prompts: list[list[int]],
             rows: list[dict], tok, cfg: PPOConfig, step: int, ptx_batches=None) -> dict:
    """One rollout batch: sample, score, advantages, then ppo_epochs of clipped updates. Returns metrics.
    ptx_batches: an iterator of (x, y) SFT batches, one per update (with cfg.ptx_coef > 0)."""
    end_id, pad_id = tok.token_to_id(END), tok.token_to_id(PAD)
    # ---- rollout: sample replies (seeded by the step, so a resumed run samples alike), score them,
    # and fix the old log-probs, reference log-probs, values
    ac.eval()
    sampling = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                stop_tokens=(end_id,), seed=cfg.seed * 1_000_003 + step)
    replies = [r if r else [end_id] for r in generate(ac.gpt, prompts, sampling, batch_size=DECODE_BATCH)]
    idx, mask = reply_batch(prompts, replies, pad_id)
    with torch.no_grad():
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
                raise FloatingPointError("ppo: non-finite loss or grad norm")
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


# ----------------------------------------------------------------------------- the loop


def ppo(cfg: PPOConfig, log=None) -> dict:
    """Run (or resume) PPO to cfg.max_steps; write the policy to cfg.out_dir; return metrics."""
    torch.manual_seed(cfg.seed)
    sft_model = load_model_folder(cfg.sft_dir)
    ref = load_model_folder(cfg.sft_dir).requires_grad_(False)   # frozen: the KL anchor
    rm = load_model_folder(cfg.reward_dir, RewardModel).requires_grad_(False)
    tok = load_tokenizer(Path(cfg.sft_dir) / "tokenizer.json")
    policy = copy.deepcopy(sft_model).train()
    # the policy and its value head train together, the head at its own learning rate
    model = PolicyWithValue(policy)
    optimizer = optimizer_for(policy, cfg, [{"params": list(model.value_head.parameters()), "weight_decay": 0.0,
                                             "lr_scale": cfg.value_lr / cfg.lr}])
    val_rows = [r for r in read_jsonl(Path(cfg.data_dir) / "sft_val.jsonl") if r["answer"] is not None]
    sft_rows = read_jsonl(Path(cfg.data_dir) / "sft_train.jsonl")
    train_rows = [r for r in sft_rows if r["answer"] is not None]
    train_prompts = [prompt_ids(tok, r) for r in train_rows]
    # PPO-ptx: one SFT batch per update, ppo_epochs * rollout_batch / minibatch_size updates a step
    conversations = encode_conversations(sft_rows, tok, policy.config.block_size)[0] if cfg.ptx_coef else []
    updates = cfg.ppo_epochs * cfg.rollout_batch // cfg.minibatch_size

    # ---- resume from the newest complete checkpoint, if any
    step, history = 0, {"train": [], "val": []}
    ckpt_root = cfg.checkpoint_root()
    meta = resume_training_state(ckpt_root, model, optimizer, policy.config, stage="rlhf (ppo)")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    resumed_at = step if meta is not None else -1

    t_start, t_last, last_step = time.perf_counter(), time.perf_counter(), step
    while step < cfg.max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

        # ---- eval and checkpoint (state before this step's update)
        if step > 0 and step != resumed_at and step % cfg.eval_interval == 0:
            history["val"].append([step, held_out_accuracy(policy, tok, val_rows, cfg)])
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save(ckpt_root, cfg, model, optimizer, step, history)

        # ---- one rollout batch and its updates
        k = cfg.replies_per_prompt
        rows = [i for i in batch_indices(len(train_prompts), cfg.rollout_batch // k, cfg.seed, step) for _ in range(k)]
        ptx = (collate([conversations[i] for i in batch_indices(len(conversations), cfg.minibatch_size,
                                                                cfg.seed, step * updates + j)],
                       tok.token_to_id(PAD)) for j in range(updates)) if cfg.ptx_coef else None
        metrics = ppo_step(model, ref, rm, optimizer, [train_prompts[i] for i in rows], [train_rows[i] for i in rows],
                           tok, cfg, step, ptx)
        step += 1
        history["train"].append([step, metrics])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            dt = (now - t_last) / max(1, step - last_step)
            t_last, last_step = now, step
            print(f"step {step:>4}/{cfg.max_steps} "
                  + " ".join(f"{k} {metrics[k]:.4f}" for k in ("reward", "kl", "clip_fraction", "rollout_accuracy"))
                  + f" lr {lr:.2e} {dt:.2f} s/step", flush=True)
            if log:
                log(step, {**metrics, "lr": lr})

    # ---- final checkpoint, held-out evaluation and model
    if step != resumed_at:
        save(ckpt_root, cfg, model, optimizer, step, history)
    train_seconds = time.perf_counter() - t_start
    evaluated, samples = evaluate_policy(policy.eval(), sft_model, ref, rm, tok, val_rows, cfg)
    metrics = {"algorithm": "ppo", "steps": step, **evaluated, "held_out_prompts": len(val_rows),
               "train_seconds": train_seconds}
    write_policy(cfg, policy, metrics, history, samples)
    return metrics


def save(root: Path, cfg: PPOConfig, model: PolicyWithValue, optimizer, step: int, history: dict) -> None:
    save_training_state(root, step, model, optimizer, model.gpt.config, cfg, history,
                        {"step": step, "prompts_seen": step * cfg.rollout_batch}, keep=cfg.keep_checkpoints)

