"""DPO on preference pairs, from the SFT model (its config and its loop; tasks/rlhf/ dispatches here).

DPO (Rafailov et al. 2023, arXiv:2305.18290): on (prompt, chosen, rejected) pairs, minimise
-log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), sequence log-probs summed
over the reply tokens, ref the frozen SFT model. A batch mixes data/chat_data's rule-made pairs with
the reward stage's `sampled_mistake` pairs (the SFT model's own wrong replies; `sampled_fraction`).
nll_weight > 0 adds the chosen reply's NLL (RPO, Pang et al. 2024, arXiv:2404.19733); 0 is plain
DPO. Why the defaults are own mistakes only and nll_weight 1: README, Alignment. rl_coef=0 leaves
the NLL term alone on the same batches and schedule: the control run.

    python -m tasks.rlhf algorithm=dpo [key=value ...]
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from forgeline.chat import PAD, collate_sequences, encode_chat, encode_pairs, load_tokenizer, read_jsonl
from forgeline.checkpoint import checkpoint_key, load_model_folder, resume_training_state, save_training_state
from forgeline.config import ConfigError
from forgeline.schedule import warmup_cosine
from models.gpt import GPT
from models.reward_model import RewardModel
from tasks.rlhf.common import (AlignmentConfig, batch_indices, evaluate_policy, held_out_accuracy,
                               optimizer_for, reply_logprobs, write_policy)


@dataclass
class DPOConfig(AlignmentConfig):
    beta: float = 0.1                     # strength of the implicit KL constraint
    nll_weight: float = 1.0               # + this * NLL per token of the chosen reply (RPO; 0 = plain DPO)
    sampled_fraction: float = 1.0         # share of each batch from the reward stage's sampled_mistake
                                          # pairs (the SFT model's own errors); 0 = rule-made pairs only
    feedback_per_batch: int = 4           # pairs per batch from users' ratings (provenance feedback), when any:
                                          # a handful among ~70k rule-made pairs would otherwise never be drawn;
                                          # 0 = they join the rule-made pool
    batch_size: int = 32                  # pairs per step

    def check(self) -> None:
        self.check_shared("dpo")
        if self.batch_size < 1 or self.beta <= 0 or not 0 <= self.sampled_fraction <= 1 or self.nll_weight < 0:
            raise ConfigError("dpo: need batch_size >= 1, beta > 0, 0 <= sampled_fraction <= 1, nll_weight >= 0")
        if not 0 <= self.feedback_per_batch <= self.batch_size:
            raise ConfigError("dpo: need 0 <= feedback_per_batch <= batch_size")
        if self.rl_coef == 0 and self.nll_weight == 0:
            raise ConfigError("dpo: rl_coef 0 with nll_weight 0 would train nothing")

    def checkpoint_root(self) -> Path:
        """ckpt_dir/dpo-<key>: the key hashes the settings, the SFT weights and the pairs."""
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints", "eval_interval", "eval_samples"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        inputs = [Path(self.sft_dir) / "model.safetensors", Path(self.reward_dir) / "sampled_pairs_train.jsonl",
                  Path(self.data_dir) / "pref_train.jsonl"]
        return Path(self.ckpt_dir) / f"dpo-{checkpoint_key(settings, inputs)}"


# ----------------------------------------------------------------------------- loss


def dpo_loss(pol_chosen: torch.Tensor, pol_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), mean over pairs; also the
    implicit reward margins beta * (...) (B,). Identical policy and reference give log 2."""
    margins = beta * ((pol_chosen - ref_chosen) - (pol_rejected - ref_rejected))
    return -F.logsigmoid(margins).mean(), margins.detach()


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


def mixed_batch(rule_pairs: list, sampled_pairs: list, batch_size: int, fraction: float, seed: int, step: int,
                feedback_pairs: list = (), feedback_per_batch: int = 0) -> list:
    """Step `step`'s pairs: `feedback_per_batch` from the users' feedback pairs (if any), then of the rest
    round(fraction * rest) from the sampled pairs and the remainder from the rule-made ones, each pool walked
    in its own seeded epochs (copied from tasks/reward.py: each loop owns its batches)."""
    f = feedback_per_batch if feedback_pairs else 0
    batch = [feedback_pairs[i] for i in batch_indices(len(feedback_pairs), f, seed + 2, step)] if f else []
    rest = batch_size - f
    k = round(fraction * rest) if sampled_pairs else 0
    if rest - k and not rule_pairs:
        raise ValueError("dpo: no rule-made pairs to fill the batch")
    batch += [rule_pairs[i] for i in batch_indices(len(rule_pairs), rest - k, seed, step)] if rest - k else []
    return batch + ([sampled_pairs[i] for i in batch_indices(len(sampled_pairs), k, seed + 1, step)] if k else [])


def dpo_step(policy: GPT, ref: GPT, optimizer, pairs: list, tok, cfg: DPOConfig) -> dict:
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
        raise FloatingPointError("dpo: non-finite loss or grad norm")
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


def dpo_rows(cfg: DPOConfig, split: str) -> tuple[list[dict], list[dict], list[dict]]:
    """The preference pairs: the rule-made ones, (if sampled_fraction > 0) the SFT model's sampled mistakes,
    and the users' feedback pairs that chat_data merged in (provenance feedback; rows without one are rule-made)."""
    sampled = read_jsonl(Path(cfg.reward_dir) / f"sampled_pairs_{split}.jsonl") if cfg.sampled_fraction else []
    pref = read_jsonl(Path(cfg.data_dir) / f"pref_{split}.jsonl")
    feedback = [r for r in pref if r.get("provenance") == "feedback"]
    return [r for r in pref if r.get("provenance") != "feedback"], sampled, feedback


# ----------------------------------------------------------------------------- the loop


def dpo(cfg: DPOConfig, log=None) -> dict:
    """Run (or resume) DPO to cfg.max_steps; write the policy to cfg.out_dir; return metrics."""
    torch.manual_seed(cfg.seed)
    sft_model = load_model_folder(cfg.sft_dir)
    ref = load_model_folder(cfg.sft_dir).requires_grad_(False)   # frozen: the implicit KL anchor
    rm = load_model_folder(cfg.reward_dir, RewardModel).requires_grad_(False)   # scores the evaluation only
    tok = load_tokenizer(Path(cfg.sft_dir) / "tokenizer.json")
    policy = copy.deepcopy(sft_model).train()
    optimizer = optimizer_for(policy, cfg)
    val_rows = [r for r in read_jsonl(Path(cfg.data_dir) / "sft_val.jsonl") if r["answer"] is not None]
    rule_pairs, sampled_pairs, feedback_pairs = (encode_pairs(rows, tok, policy.config.block_size)
                                                 for rows in dpo_rows(cfg, "train"))
    n_feedback = len(feedback_pairs)
    if not cfg.feedback_per_batch:   # no share of their own: drawn like any rule-made pair
        rule_pairs, feedback_pairs = rule_pairs + feedback_pairs, []

    # ---- resume from the newest complete checkpoint, if any
    step, history = 0, {"train": [], "val": []}
    ckpt_root = cfg.checkpoint_root()
    meta = resume_training_state(ckpt_root, policy, optimizer, policy.config, stage="rlhf (dpo)")
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
            save(ckpt_root, cfg, policy, optimizer, step, history)

        # ---- one batch of pairs
        batch = mixed_batch(rule_pairs, sampled_pairs, cfg.batch_size, cfg.sampled_fraction, cfg.seed, step,
                            feedback_pairs, cfg.feedback_per_batch)
        metrics = dpo_step(policy, ref, optimizer, batch, tok, cfg)
        step += 1
        history["train"].append([step, metrics])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            dt = (now - t_last) / max(1, step - last_step)
            t_last, last_step = now, step
            print(f"step {step:>4}/{cfg.max_steps} "
                  + " ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "reward_accuracy", "margin", "chosen_logratio"))
                  + f" lr {lr:.2e} {dt:.2f} s/step", flush=True)
            if log:
                log(step, {**metrics, "lr": lr})

    # ---- final checkpoint, held-out evaluation and model
    if step != resumed_at:
        save(ckpt_root, cfg, policy, optimizer, step, history)
    train_seconds = time.perf_counter() - t_start
    evaluated, samples = evaluate_policy(policy.eval(), sft_model, ref, rm, tok, val_rows, cfg)
    # held-out pairs of the kinds training drew: rule-made unless sampled_fraction == 1, the sampled
    # mistakes if sampled_fraction > 0, the users' feedback pairs; each kind also on its own
    rule_val, sampled_val, feedback_val = dpo_rows(cfg, "val")
    kinds = {"rule": rule_val if cfg.sampled_fraction < 1 else [], "sampled": sampled_val,
             "feedback": feedback_val}
    for kind, rows in kinds.items():
        if rows:
            found = dpo_held_out(policy, ref, encode_pairs(rows, tok, policy.config.block_size), tok, cfg.beta)
            evaluated.update({f"{k}.{kind}": v for k, v in found.items()})
    evaluated.update(dpo_held_out(policy, ref, encode_pairs(sum(kinds.values(), []), tok, policy.config.block_size),
                                  tok, cfg.beta))
    metrics = {"algorithm": "dpo", "steps": step, **evaluated, "held_out_prompts": len(val_rows),
               "feedback_pairs_train": n_feedback,
               "train_seconds": train_seconds}
    write_policy(cfg, policy, metrics, history, samples)
    return metrics


def save(root: Path, cfg: DPOConfig, policy: GPT, optimizer, step: int, history: dict) -> None:
    save_training_state(root, step, policy, optimizer, policy.config, cfg, history,
                        {"step": step, "pairs_seen": step * cfg.batch_size}, keep=cfg.keep_checkpoints)
