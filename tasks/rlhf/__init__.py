"""RLHF: improve the SFT model with PPO against the reward model, or with DPO on the preference pairs.

One DVC stage, `rlhf`; `algorithm` in configs/rlhf.yaml picks the method. Each method is a config
and a loop of its own, as TRL pairs `<method>_config` with `<method>_trainer`: tasks/rlhf/ppo.py
(PPOConfig, ppo) and tasks/rlhf/dpo.py (DPOConfig, dpo); what both share (the common settings,
log-probs of replies, reward scores, the held-out evaluation) is tasks/rlhf/common.py.

RLHFConfig is the stage's config as configs/rlhf.yaml, `key=value` overrides and the flow's form
see it: `algorithm` plus the fields of both methods, flat. `method()` picks the chosen method's
own config out of it, so the other method's fields never reach the loop or its checkpoint key.

    python -m tasks.rlhf [algorithm=ppo|dpo] [key=value ...]
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from prefect import task

from forgeline.config import config_dict, load_config
from forgeline.workspace import run_stage
from tasks.rlhf.dpo import DPOConfig, dpo
from tasks.rlhf.ppo import PPOConfig, ppo


@dataclass
class RLHFConfig(PPOConfig, DPOConfig):
    algorithm: Literal["ppo", "dpo"] = "ppo"

    def method(self) -> PPOConfig | DPOConfig:
        """The chosen method's own config: the shared fields and its own, nothing of the other method's."""
        cls = PPOConfig if self.algorithm == "ppo" else DPOConfig
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def check(self) -> None:
        self.method().check()

    def checkpoint_root(self) -> Path:
        return self.method().checkpoint_root()


def rlhf(cfg: RLHFConfig, log=None) -> dict:
    """Run (or resume) cfg.algorithm to cfg.max_steps; write the policy to cfg.out_dir; return metrics."""
    method = cfg.method()
    return ppo(method, log) if isinstance(method, PPOConfig) else dpo(method, log)


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
