"""forgeline/plan.py: which stages a run would rerun and why, and the time/memory estimate of training stages.

Staleness is checked on a two-stage toy DVC repo (real DVC, no training); the estimate's parameter count
against models/gpt.py's real model.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from forgeline import plan as planmod
from forgeline.pipelines import pipelines
from tests.conftest import run_in


def dvc(cwd, *args):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture
def toy(tmp_path):
    """a -> b: `a` copies in.txt and reads cfg/a.yaml; `b` copies a's output."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "a.yaml").write_text("lr: 0.1\nsteps: 5\n")
    (tmp_path / "in.txt").write_text("x\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "cp in.txt a.txt", "deps": ["in.txt"], "params": [{"cfg/a.yaml": None}], "outs": ["a.txt"]},
        "b": {"cmd": "cp a.txt b.txt", "deps": ["a.txt"], "outs": ["b.txt"]}}}))
    return tmp_path


def reasons(plans):
    return {p.stage: p.reasons for p in plans}


def test_never_run_stages_all_run(toy):
    got = reasons(planmod.plan(["a", "b"], {}, {}, root=toy))
    assert got["a"] == ["never run (not in dvc.lock)"]
    assert got["b"][0] == "never run (not in dvc.lock)"


def test_up_to_date_then_a_param_change_names_the_param_and_downstream(toy):
    dvc(toy, "repro", "-q")
    assert reasons(planmod.plan(["a", "b"], {}, {}, root=toy)) == {"a": [], "b": []}
    (toy / "cfg" / "a.yaml").write_text("lr: 0.2\nsteps: 5\n")
    got = reasons(planmod.plan(["a", "b"], {}, {}, root=toy))
    assert got == {"a": ["param lr: 0.1 -> 0.2"], "b": ["upstream a reruns"]}


def test_an_override_is_planned_without_being_written(toy):
    dvc(toy, "repro", "-q")
    got = reasons(planmod.plan(["a", "b"], {}, {"a": {"steps": 9}}, root=toy))
    assert got == {"a": ["param steps: 5 -> 9"], "b": ["upstream a reruns"]}
    assert yaml.safe_load((toy / "cfg" / "a.yaml").read_text()) == {"lr": 0.1, "steps": 5}


def test_a_changed_dep_and_a_missing_out(toy):
    dvc(toy, "repro", "-q")
    (toy / "in.txt").write_text("y\n")
    (toy / "b.txt").unlink()
    got = reasons(planmod.plan(["a", "b"], {}, {}, root=toy))
    assert got["a"] == ["dep in.txt modified"]
    assert "out b.txt deleted" in got["b"] and "upstream a reruns" in got["b"]


@pytest.mark.parametrize("fields", [
    {"preset": "tiny", "vocab_size": 4096},
    {"preset": "tiny", "vocab_size": 300, "n_kv_heads": 2, "mlp": "gelu", "norm": "layernorm", "bias": True,
     "pos_encoding": "learned", "tie_weights": False},
    {"preset": "small", "vocab_size": 1000},
    {"preset": "gpt2-124m", "vocab_size": 512, "n_layer": 2},
])
def test_param_count_matches_the_real_model(fields):
    from models.gpt import GPT, GPTConfig

    cfg = planmod.gpt_config(fields)
    real = sum(p.numel() for p in GPT(GPTConfig(**cfg)).parameters())
    assert planmod.gpt_params(cfg) == real


def configs(**pretrain):
    spec = planmod.flow_stages(planmod.ROOT / "flows" / "llm.py")
    return {s: planmod.resolve_static(s, planmod.static_dataclass(*spec[s]), pretrain if s == "pretrain" else {})
            for s in spec}


RATE = {"train": 1e11, "decode": 1e10, "peak": 2e11, "source": "test"}


def test_estimates_scale_with_the_config_and_warn_beyond_memory():
    small = planmod.estimate("pretrain", configs(max_steps=100), RATE)
    assert small["tokens_trained"] == 100 * 16 * 128 and small["fits"]
    assert planmod.estimate("pretrain", configs(max_steps=200), RATE)["seconds"] == pytest.approx(2 * small["seconds"])
    huge = planmod.estimate("pretrain", configs(preset="gpt2-124m", block_size=1024, batch_size=4096), RATE)
    assert not huge["fits"] and huge["peak_bytes"] > huge["available_bytes"]
    text = planmod.format_plan([planmod.StagePlan("pretrain", ["param batch_size: 16 -> 4096"], huge)])
    assert "WARNING: pretrain would need" in text
    # every alignment stage has an estimate (ppo rollouts and dpo pairs)
    for stage in ("sft", "reward", "rlhf"):
        assert planmod.estimate(stage, configs(), RATE)["seconds"] > 0


def test_an_unknown_override_key_fails():
    with pytest.raises(planmod.ConfigError, match="max_stepz"):
        planmod.plan_pipeline("llm", ["pretrain.max_stepz=3"])


def test_the_cli_on_a_fresh_workspace_says_every_stage_never_ran(workspace):
    out = run_in(workspace, "-m", "forgeline", "plan", "llm", "pretrain.max_steps=7").stdout
    n = len(pipelines()["llm"])
    assert out.count("never run (not in dvc.lock)") == n, out
    assert f"{n} of {n} stages would run" in out and "estimate:" in out
    # nothing was written: the override stayed in memory
    assert yaml.safe_load((workspace / "configs" / "pretrain.yaml").read_text())["max_steps"] != 7
