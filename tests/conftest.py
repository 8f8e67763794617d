"""Shared fixtures: a throw-away copy of the repo to run whole pipelines in."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the alignment stages in the pipeline tests: a few steps each on a small chat dataset (the demo
# and bench/bench_alignment.py train them as configs/ say; tests/test_{sft,reward,rlhf}.py measure gains)
ALIGNMENT_FAST = {
    "chat_data": {"train_per_task": 40, "val_per_task": 6},
    "sft": {"max_steps": 4, "batch_size": 8, "eval_interval": 2, "ckpt_interval": 2, "log_interval": 2},
    "reward": {"max_steps": 4, "batch_size": 8, "sampled_prompts": 16, "eval_interval": 2, "ckpt_interval": 2,
               "log_interval": 2},
    "rlhf": {"max_steps": 2, "rollout_batch": 8, "minibatch_size": 8, "ppo_epochs": 1, "eval_interval": 1,
             "ckpt_interval": 1, "log_interval": 1, "eval_samples": 1},
    # the guard on a sample of its sources; the gate on a few prompts (a 4-step model fails it: that is fine)
    "safety": {"max_per_source": 80, "max_chatterbot": 150, "steps": 100},
    "deploy": {"safety_prompts": 40, "latency_prompts": 8, "warmup_prompts": 1, "serve_max_tokens": 16},
}


def cli_overrides(settings: dict[str, dict]) -> list[str]:
    """{stage: {key: value}} -> ['stage.key=value', ...] for `python -m flows.llm`."""
    return [f"{stage}.{k}={v}" for stage, kv in settings.items() for k, v in kv.items()]


def stage_lines(out: str, stages: list[str]) -> dict[str, str]:
    """'    ingest: ran in 3.2s' lines printed by `python -m flows.<pipeline>` -> {stage: 'ran'|'skipped'}."""
    found = {}
    for line in out.splitlines():
        stage, sep, rest = line.strip().partition(": ")
        if sep and stage in stages and ("ran in" in rest or "skipped" in rest):
            found[stage] = "skipped" if rest.startswith("skipped") else "ran"
    return found


def make_workspace(dst: Path) -> Path:
    """Copy the repo's tracked and unignored files to `dst` and commit them there.

    Pipelines write dvc.lock, data/, mlflow.db and configs: never into the developer's tree.
    """
    def ls(*flags: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", *flags, "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return list(filter(None, out.decode().split("\0")))

    # tracked files, and new files not yet committed, less the outputs of the developer's own runs
    files = ls("-c") + [rel for rel in ls("-o", "--exclude-standard") if not rel.startswith("data/")]
    for rel in files:
        if rel == "dvc.lock" or rel.startswith("data/") and rel.endswith(".gitignore"):
            continue  # state of the developer's own runs, not of the repo
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    git = ["git", "-c", "user.name=forgeline-test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dst, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dst, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "workspace"], cwd=dst, check=True)
    return dst


def commit_settings(ws: Path, settings: list[str]) -> None:
    """Write `stage.key=value` settings into the workspace's configs/ and commit them: the values every
    plain run there uses (a run's own overrides apply to that run only)."""
    from forgeline.config import parse_overrides, write_overrides

    for key, value in parse_overrides(settings).items():
        stage, _, name = key.partition(".")
        write_overrides(stage, {name: value}, ws / "configs" / f"{stage}.yaml")
    git = ["git", "-c", "user.name=forgeline-test", "-c", "user.email=test@localhost"]
    subprocess.run(git + ["commit", "-qam", "short settings for the tests"], cwd=ws, check=True)


def workspace_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "FORGELINE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def run_in(ws: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m ...` (or any command) inside a workspace, capturing output."""
    cmd = [sys.executable, *args] if args[0] == "-m" else list(args)
    proc = subprocess.run(cmd, cwd=ws, env=workspace_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("ws"))
