"""Reward: a scalar-head GPT, initialised from the SFT model, trained on preference pairs.

The loss is a hinge on the score gap (models/reward_model.py): a pair costs margin - (s_chosen -
s_rejected) until the chosen answer leads by `margin`, then nothing. Both sequences are
prompt + reply + <|end|> in the chat template; the score is read at that <|end|>. One linear loop
as in tasks/sft.py; a batch of pairs is a pure function of (seed, step), so resume is exact.
Reports held-out pairwise accuracy (share of pairs where the chosen answer scores higher),
overall, per rule and per task; chance is 0.5.

Besides the rule-made pairs of data/chat_data, the stage adds pairs of one more rule,
`sampled_mistake`: the SFT model replies to `sampled_prompts` verifiable train prompts (and to
every verifiable val prompt, for the held-out score), sampling at temperature 1 from a fixed
seed; each reply the checker marks wrong becomes the rejected side, the correct answer the
chosen one. The rules alone leave blind spots a policy finds (in a PPO trial: a final "s" in
place of the right letter scored above the correct reversal); the SFT model's own mistakes are
what PPO starts from. The pairs are written to sampled_pairs_{train,val}.jsonl beside the model
(DPO in tasks/rlhf/dpo.py trains on them too).

    python -m tasks.reward [key=value ...]
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from prefect import task

from forgeline.chat import (END, PAD, collate_sequences, decode_reply, encode_pairs, is_correct, load_tokenizer,
                            prompt_ids, read_jsonl, write_jsonl)
from forgeline.checkpoint import (checkpoint_key, latest_checkpoint, load_model_folder, resume_training_state,
                                  save_model_folder, save_training_state)
from forgeline.config import ConfigError, config_dict, load_config
from forgeline.schedule import warmup_cosine
from forgeline.workspace import run_stage
from models.reward_model import RewardModel, pairwise_margin_loss
from models.sampling import GenerationConfig, generate


@dataclass
class RewardConfig:
    sft_dir: str = "data/sft"             # the SFT model folder: the trunk's starting weights
    data_dir: str = "data/chat_data"      # pref_train.jsonl, pref_val.jsonl
    out_dir: str = "data/reward"          # the reward model folder + metrics.json
    ckpt_dir: str = "checkpoints/reward"
    margin: float = 1.0                   # the chosen score should lead the rejected one by this much
    sampled_prompts: int = 12000          # train prompts whose sampled SFT reply, if wrong, makes a pair; 0 = none
    sampled_fraction: float = 0.5         # share of each batch drawn from those pairs (~10% of all pairs)
    max_new_tokens: int = 16              # sampled reply length cap
    # optimisation
    batch_size: int = 32                  # pairs per step (2x sequences)
    max_steps: int = 500
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    eval_interval: int = 250
    ckpt_interval: int = 250
    keep_checkpoints: int = 2
    log_interval: int = 20
    seed: int = 1337

    def check(self) -> None:
        for name in ("batch_size", "max_steps", "eval_interval", "ckpt_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reward: {name} must be >= 1")
        if self.margin < 0 or self.sampled_prompts < 0 or not 0 <= self.sampled_fraction < 1 \
                or not 0 <= self.min_lr <= self.lr:
            raise ConfigError("reward: need margin >= 0, sampled_prompts >= 0, 0 <= sampled_fraction < 1, "
                              "0 <= min_lr <= lr")

    def checkpoint_root(self) -> Path:
        skip = {"out_dir", "ckpt_dir", "log_interval", "keep_checkpoints"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        inputs = [Path(self.sft_dir) / "model.safetensors", Path(self.data_dir) / "pref_train.jsonl"]
        return Path(self.ckpt_dir) / checkpoint_key(settings, inputs)


# ----------------------------------------------------------------------------- data
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


@torch.no_grad()
def sampled_mistakes(model, tok, rows: list[dict], max_new_tokens: int, seed: int) -> list[dict]:
    """`sampled_mistake` pairs: (correct answer, the model's reply) for each verifiable row whose
    reply, sampled at temperature 1 from `seed`, the checker marks wrong."""
    model.eval()
    sampling = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, stop_tokens=(tok.token_to_id(END),),
                                seed=seed)
    gens = generate(model, [prompt_ids(tok, r) for r in rows], sampling, batch_size=512)
    pairs = []
    for r, g in zip(rows, gens):
        reply, _ = decode_reply(tok, g)
        if not is_correct(reply, r["answer"]):
            pairs.append({"task": r["source"], "rule": "sampled_mistake", "prompt": r["messages"][:-1],
                          "chosen": r["answer"], "rejected": reply, "answer": r["answer"]})
    return pairs


def mixed_batch(rule_pairs: list, sampled_pairs: list, batch_size: int, fraction: float, seed: int, step: int) -> list:
    """Step `step`'s pairs: round(fraction * batch_size) from the sampled pairs, the rest from the
    rule-made ones, each pool walked in its own seeded epochs (batch_indices)."""
    k = round(fraction * batch_size) if sampled_pairs else 0
    batch = [rule_pairs[i] for i in batch_indices(len(rule_pairs), batch_size - k, seed, step)]
    return batch + ([sampled_pairs[i] for i in batch_indices(len(sampled_pairs), k, seed + 1, step)] if k else [])


def score_pairs(rm: RewardModel, pairs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and the rejected sequences, (B,) each, in one forward."""
    idx, last = collate_sequences([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    scores = rm(idx, last)
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, pairs: list, pad_id: int, margin: float, batch_size: int = 128) -> dict:
    """Share of pairs with s_chosen > s_rejected (a tie counts as wrong), overall / per rule / per task."""
    was_training = rm.training
    rm.eval()
    wins, losses, gaps = [], [], []
    for b in range(0, len(pairs), batch_size):
        c, r = score_pairs(rm, pairs[b:b + batch_size], pad_id)
        wins += (c > r).tolist()
        gaps += (c - r).tolist()
        losses.append(pairwise_margin_loss(c, r, margin).item() * len(c))
    rm.train(was_training)
    metrics = {"pairwise_accuracy": sum(wins) / len(wins), "val_loss": sum(losses) / len(wins),
               "mean_gap": sum(gaps) / len(gaps)}
    for key in ("rule", "task"):
        for value in sorted({p[2][key] for p in pairs}):
            hits = [w for w, p in zip(wins, pairs) if p[2][key] == value]
            metrics[f"pairwise_accuracy.{value}"] = sum(hits) / len(hits)
    return metrics


# ----------------------------------------------------------------------------- the loop


def reward(cfg: RewardConfig, log=None) -> dict:
    """Train (or resume) the reward model to cfg.max_steps; write it to cfg.out_dir; return metrics."""
    torch.manual_seed(cfg.seed)
    sft_model = load_model_folder(cfg.sft_dir)
    rm = RewardModel(sft_model.config)
    rm.gpt.load_state_dict(sft_model.state_dict())  # the trunk starts as the SFT model; the head is new
    rm.train()
    tok = load_tokenizer(Path(cfg.sft_dir) / "tokenizer.json")
    pad_id = tok.token_to_id(PAD)
    block = rm.gpt.config.block_size
    # ---- the pairs: rule-made ones, and the SFT model's own mistakes (deterministic: regenerated on resume)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampled = {}
    for split in ("train", "val"):
        rows = [r for r in read_jsonl(Path(cfg.data_dir) / f"sft_{split}.jsonl") if r["answer"] is not None]
        if split == "train":
            rows = [rows[i] for i in batch_indices(len(rows), min(cfg.sampled_prompts, len(rows)), cfg.seed, 0)]
        sampled[split] = (sampled_mistakes(sft_model, tok, rows, cfg.max_new_tokens, cfg.seed)
                          if cfg.sampled_prompts else [])
        write_jsonl(out / f"sampled_pairs_{split}.jsonl",
                    [{"id": f"sampled-{split}-{i}", **r} for i, r in enumerate(sampled[split])])
    train = encode_pairs(read_jsonl(Path(cfg.data_dir) / "pref_train.jsonl"), tok, block)
    train_sampled = encode_pairs(sampled["train"], tok, block)
    val = encode_pairs(read_jsonl(Path(cfg.data_dir) / "pref_val.jsonl") + sampled["val"], tok, block)
    # the optimizer of GPT.configure_optimizers, over the trunk and the head
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    # ---- resume, or score the untrained head first (chance level)
    step, history = 0, {"train": [], "val": [], "init": {}}
    ckpt_root = cfg.checkpoint_root()
    meta = resume_training_state(ckpt_root, rm, optimizer, rm.gpt.config, stage="reward")
    if meta is not None:
        step, history = meta["step"], meta["history"]
    else:
        history["init"] = pairwise_accuracy(rm, val, pad_id, cfg.margin)
        print(f"reward: before training, held-out pairwise accuracy {history['init']['pairwise_accuracy']:.3f}",
              flush=True)
    resumed_at = step if meta is not None else -1

    t_start, t_last, last_step = time.perf_counter(), time.perf_counter(), step
    while step < cfg.max_steps:
        # ---- learning rate
        lr = warmup_cosine(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- eval and checkpoint
        if step > 0 and step != resumed_at and step % cfg.eval_interval == 0:
            history["val"].append([step, pairwise_accuracy(rm, val, pad_id, cfg.margin)["pairwise_accuracy"]])
        if step > 0 and step != resumed_at and step % cfg.ckpt_interval == 0:
            save(ckpt_root, cfg, rm, optimizer, step, history)

        # ---- one step on a batch of pairs
        batch = mixed_batch(train, train_sampled, cfg.batch_size, cfg.sampled_fraction, cfg.seed, step)
        chosen, rejected = score_pairs(rm, batch, pad_id)
        loss = pairwise_margin_loss(chosen, rejected, cfg.margin)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(rm.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
            raise FloatingPointError(f"reward: non-finite loss or grad norm at step {step}; "
                                     f"last checkpoint: {latest_checkpoint(ckpt_root) or 'none'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        acc = (chosen > rejected).float().mean().item()
        history["train"].append([step, loss.item(), acc])

        # ---- log
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            dt = (now - t_last) / max(1, step - last_step)
            t_last, last_step = now, step
            print(f"step {step:>5}/{cfg.max_steps} loss {loss.item():.4f} batch acc {acc:.3f} lr {lr:.2e} "
                  f"{dt * 1000:.0f} ms/step", flush=True)
            if log:
                log(step, {"loss": loss.item(), "batch_accuracy": acc, "lr": lr, "grad_norm": float(grad_norm)})

    # ---- final eval, checkpoint and model
    if step != resumed_at:
        save(ckpt_root, cfg, rm, optimizer, step, history)
    scored = pairwise_accuracy(rm, val, pad_id, cfg.margin)
    metrics = {"steps": step, **scored, "init_pairwise_accuracy": history["init"]["pairwise_accuracy"],
               "train_pairs": len(train) + len(train_sampled), "val_pairs": len(val),
               "sampled_pairs_train": len(sampled["train"]),
               "sampled_pairs_val": len(sampled["val"]), "train_seconds": time.perf_counter() - t_start}
    write_model(cfg, rm, metrics, history)
    return metrics


def save(root: Path, cfg: RewardConfig, rm: RewardModel, optimizer, step: int, history: dict) -> None:
    save_training_state(root, step, rm, optimizer, rm.gpt.config, cfg, history,
                        {"step": step, "pairs_seen": step * cfg.batch_size}, keep=cfg.keep_checkpoints)


def write_model(cfg: RewardConfig, rm: RewardModel, metrics: dict, history: dict) -> None:
    """data/reward/: config.json (the trunk's GPTConfig), model.safetensors (trunk + head), tokenizer;
    `load_model_folder(path, RewardModel)` reads it back."""
    out = save_model_folder(cfg.out_dir, rm, rm.gpt.config, Path(cfg.sft_dir) / "tokenizer.json")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(history))


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    cfg = load_config(RewardConfig, "reward", sys.argv[1:] if argv is None else argv)
    with stage_run("reward", config_dict(cfg)):
        metrics = reward(cfg, log=lambda step, m: mlflow.log_metrics(m, step=step))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "metrics.json"))
    print(f"reward: {metrics['steps']} steps, held-out pairwise accuracy "
          f"{metrics['init_pairwise_accuracy']:.3f} -> {metrics['pairwise_accuracy']:.3f} (chance 0.5)")


@task(name="reward", retries=1, retry_delay_seconds=10)
def reward_task(run: dict[str, str]) -> dict:
    return run_stage("reward", **run)


if __name__ == "__main__":
    main()
