"""What PPO and DPO share: the settings of both, log-probs of replies, reward scores, the held-out evaluation.

Both start the policy from the SFT model, keep a frozen copy of it as the reference, and end with
the same held-out evaluation on the verifiable val prompts, greedy replies: exact-match accuracy of
the policy and of the SFT model, the win rate of the policy against the SFT model judged by the
ground truth (a prompt is a win when only the policy is right, a loss when only the SFT model is
right, a tie otherwise; win_rate = (wins + ties/2) / prompts, decisive_win_rate = wins / (wins +
losses)), the same win rate judged by the reward model (so reward hacking shows as a gap between
the two), the mean reward of the greedy replies and of replies sampled at temperature 1, and the KL
of the policy to the reference (mean over held-out prompts of the summed log-ratio of sampled
replies). On eval_samples replies per prompt sampled at temperature 1 (both models from the same
seed): each model's sampled accuracy and the paired sampled win rate by the ground truth.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from forgeline.chat import END, PAD, collate_sequences, decode_reply, is_correct, prompt_ids
from forgeline.checkpoint import save_model_folder
from forgeline.config import ConfigError
from models.gpt import GPT
from models.reward_model import RewardModel
from models.sampling import GenerationConfig, generate

DECODE_BATCH = 512   # prompts decoded at a time: the KV cache grows with the batch


@dataclass
class AlignmentConfig:
    sft_dir: str = "data/sft"             # the policy's start and the frozen reference
    reward_dir: str = "data/reward"       # the reward model (PPO's rewards; scored in every evaluation)
    data_dir: str = "data/chat_data"      # sft_train.jsonl (PPO prompts), pref_train.jsonl (DPO), *_val
    out_dir: str = "data/rlhf"            # the policy's model folder + metrics.json
    ckpt_dir: str = "checkpoints/rlhf"
    # optimisation
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
                                          # 0 keeps only the SFT term (ptx_coef / nll_weight): the control run
                                          # that tells what the reward model / the preferences add
    missing_end_penalty: float = 1.0      # subtracted from the reward-model score of a reply with no <|end|>
    # bookkeeping
    eval_samples: int = 4                 # replies sampled per held-out prompt for the sampled win rate
    eval_interval: int = 50               # steps between held-out accuracies
    ckpt_interval: int = 50
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 1337

    def check_shared(self, name: str) -> None:
        for field in ("max_steps", "eval_interval", "ckpt_interval", "log_interval", "max_new_tokens", "eval_samples"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{name}: {field} must be >= 1")
        if not 0 <= self.min_lr <= self.lr or self.rl_coef < 0:
            raise ConfigError(f"{name}: need 0 <= min_lr <= lr, rl_coef >= 0")


# batch_indices is copied into each training stage on purpose (as nanochat does): each loop owns its batches


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of step `step`: positions step*B .. step*B+B-1 of epoch permutations seeded by (seed, epoch)."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out.append(perms[epoch][offset])
    return out


def optimizer_for(policy: GPT, cfg: AlignmentConfig, extra: list[dict] = ()) -> torch.optim.AdamW:
    """GPT.configure_optimizers' groups with an `lr_scale` each (the loop sets lr * lr_scale), plus `extra`."""
    params = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}, *extra]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


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


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_policy(policy: GPT, sft_model: GPT, ref: GPT, rm: RewardModel, tok, rows: list[dict],
                    cfg: AlignmentConfig) -> tuple[dict, list[dict]]:
    """Held-out metrics of the policy against the SFT model (see the module docstring); also per-prompt samples."""
    end_id, pad_id = tok.token_to_id(END), tok.token_to_id(PAD)
    prompts = [prompt_ids(tok, r) for r in rows]
    tasks = sorted({r["source"] for r in rows})
    greedy = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_tokens=(end_id,))
    out, replies = {}, {}
    for name, model in (("policy", policy), ("sft", sft_model)):
        gens = [g if g else [end_id] for g in generate(model.eval(), prompts, greedy, batch_size=DECODE_BATCH)]
        texts = [decode_reply(tok, g)[0] for g in gens]
        correct = torch.tensor([is_correct(t, r["answer"]) for t, r in zip(texts, rows)])
        scores = reward_scores(rm, prompts, gens, end_id, pad_id, cfg.missing_end_penalty)
        replies[name] = (texts, correct, scores)
        out[f"{name}_task_accuracy"] = correct.float().mean().item()
        out[f"{name}_mean_reward"] = scores.mean().item()
        for t in tasks:
            sel = torch.tensor([r["source"] == t for r in rows])
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
    sampling = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, stop_tokens=(end_id,),
                                seed=cfg.seed + 1)   # both models draw the same uniforms
    sampled_correct = {}
    for name, model in (("policy", policy), ("sft", sft_model)):
        sampled = [g if g else [end_id] for g in generate(model, many, sampling, batch_size=DECODE_BATCH)]
        scores = reward_scores(rm, many, sampled, end_id, pad_id, cfg.missing_end_penalty)
        correct = torch.tensor([is_correct(decode_reply(tok, g)[0], a) for g, a in zip(sampled, answers)])
        sampled_correct[name] = correct
        out[f"{name}_sampled_reward"] = scores.mean().item()
        out[f"{name}_sampled_accuracy"] = correct.float().mean().item()
        for t in tasks:
            sel = torch.tensor([r["source"] == t for r in rows for _ in range(k)])
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
def held_out_accuracy(policy: GPT, tok, rows: list[dict], cfg: AlignmentConfig) -> float:
    """Greedy exact-match accuracy on `rows`; leaves the policy in train mode (called inside the loop)."""
    greedy = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_tokens=(tok.token_to_id(END),))
    gens = generate(policy.eval(), [prompt_ids(tok, r) for r in rows], greedy, batch_size=DECODE_BATCH)
    policy.train()
    return sum(is_correct(decode_reply(tok, g)[0], r["answer"]) for g, r in zip(gens, rows)) / len(rows)


def write_policy(cfg: AlignmentConfig, policy: GPT, metrics: dict, history: dict, samples: list[dict]) -> None:
    """data/rlhf/: the policy as a model folder (as data/sft), metrics.json, history.json, samples.json."""
    out = save_model_folder(cfg.out_dir, policy, policy.config, Path(cfg.sft_dir) / "tokenizer.json")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
