"""What a pipeline run would do, without doing it: the stages DVC would rerun and why, and for each
training stage among them the time and peak memory it needs on this machine.

    forgeline plan <pipeline> [stage.key=value ...]   # e.g. llm; also: python -m flows.llm --plan [stage.key=value ...]

Fast by construction (the target is <= 3 s): nothing here imports torch, Prefect, MLflow or a stage
module (importing one costs seconds: torch and Prefect). The stage configs are read from the
source of their dataclasses (`static_config`), the model presets from models/gpt.py the same way.
Overrides are applied in memory only: nothing is written.
"""
from __future__ import annotations

import ast
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forgeline.config import ConfigError, _check, parse_overrides, read_yaml
from forgeline.paths import ROOT, config_path
from forgeline.pipelines import flow_stages, module_path

TRAINING = ("pretrain", "sft", "reward", "rlhf")
# RSS of a stage process before its model exists: Python, torch, the stage's imports and data
# (measured: `import torch, tasks.rlhf` on torch 2.13 CPU ~0.45 GB); added to every memory estimate
PROCESS_BYTES = 0.5e9


# ----------------------------------------------------------------------------- reading source, not importing


class Unread:
    """A default the plan cannot read from source (an expression): only the stage itself needs it."""

    def __repr__(self) -> str:
        return "<unread>"


def _literal(node: ast.AST, names: dict[str, Any]) -> Any:
    """A default from the source: a literal, a module-level constant, `field(default_factory=lambda: <literal>)`
    or `=dict` / `=list`; anything else is Unread."""
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
        for kw in node.keywords:
            if kw.arg == "default":
                return _literal(kw.value, names)
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Lambda):
                return _literal(kw.value.body, names)
            if kw.arg == "default_factory" and getattr(kw.value, "id", "") in ("dict", "list"):
                return {"dict": {}, "list": []}[kw.value.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return Unread()


def static_dataclass(path: Path, name: str) -> dict[str, tuple[str, Any]]:
    """{field: (annotation source, default)} of dataclass `name` in `path`, read without importing it."""
    tree = ast.parse(path.read_text())
    names = {}
    for node in tree.body:  # module-level constants a default may name
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _literal(node.value, names)
            if not isinstance(value, Unread):
                names[node.targets[0].id] = value
    imported = {alias.asname or alias.name: node.module for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module for alias in node.names}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields: dict[str, tuple[str, Any]] = {}
            # dataclass fields of the bases come first, the last base's first (Python's MRO order
            # for the bases a stage config combines, e.g. RLHFConfig(PPOConfig, DPOConfig))
            for base in reversed(node.bases):
                where = path if base.id not in imported else module_path(imported[base.id])
                fields.update(static_dataclass(where, base.id))
            fields.update({item.target.id: (ast.unparse(item.annotation), _literal(item.value, names))
                           for item in node.body
                           if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value})
            return fields
    raise ConfigError(f"{path}: no class {name}")


_TYPES = {"Literal": typing.Literal, "Any": Any, "int": int, "float": float, "str": str, "bool": bool,
          "list": list, "dict": dict, "tuple": tuple, "None": None}


def resolve_static(stage: str, spec: dict[str, tuple[str, Any]], overrides: dict[str, Any]) -> dict[str, Any]:
    """defaults < configs/<stage>.yaml < overrides, keys and types checked as forgeline.config does
    (the dataclass's own cross-field `check()` runs only when the stage does)."""
    values = {**{k: d for k, (_, d) in spec.items()}, **read_yaml(config_path(stage)), **overrides}
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise ConfigError(f"{stage} config: unknown key(s) {unknown}; known keys: {sorted(spec)}")
    for k in overrides:
        _check(f"{stage} config: {k}", values[k], eval(spec[k][0], dict(_TYPES)))  # noqa: S307 (our own source)
    return values


def gpt_config(fields: dict[str, Any]) -> dict[str, Any]:
    """GPTConfig's fields: its defaults < preset (models/gpt.py PRESETS) < `fields`; `preset` names it."""
    src = ROOT / "models" / "gpt.py"
    defaults = {k: d for k, (_, d) in static_dataclass(src, "GPTConfig").items()}
    presets = {}
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PRESETS" for t in node.targets):
            presets = {ast.literal_eval(k): {kw.arg: _literal(kw.value, {}) for kw in v.keywords}
                       for k, v in zip(node.value.keys, node.value.values)}
    fields = dict(fields)
    preset = presets[fields.pop("preset")] if "preset" in fields else {}
    return {**defaults, **preset, **{k: v for k, v in fields.items() if k in defaults}}


# ----------------------------------------------------------------------------- what would run, and why


@dataclass
class StagePlan:
    stage: str
    reasons: list[str] = field(default_factory=list)   # empty: up to date, DVC would skip it
    estimate: dict[str, Any] | None = None             # training stages that would run

    @property
    def runs(self) -> bool:
        return bool(self.reasons)


def _same(a: Any, b: Any) -> bool:
    """Equal as YAML values: an override read as YAML 1.1 (forgeline.config) is '5e-05' where DVC's
    YAML 1.2 reads 5e-05 (1.1 wants a dot in a float)."""
    if isinstance(a, str) != isinstance(b, str):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def _params_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if k not in new:
            out.append(f"param {k} removed (was {old[k]!r})")
        elif k not in old:
            out.append(f"param {k} added: {new[k]!r}")
        elif not _same(old[k], new[k]):
            out.append(f"param {k}: {old[k]!r} -> {new[k]!r}")
    return out


def _dvc_status(stages: list[str], root: Path) -> dict[str, list]:
    """DVC's own verdict on deps and outs (it hashes with its state cache: fast when nothing changed)."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            # addressed by dvc.yaml's absolute path: a bare name resolves against the cwd
            found = repo.status(targets=[f"{root / 'dvc.yaml'}:{s}" for s in stages])
    except LockError as e:
        raise ConfigError(f"DVC is busy (a pipeline run holds its lock?): {e}") from None
    return {k.rpartition(":")[2]: v for k, v in found.items()}


def stage_graph(dvc_yaml: Path) -> dict[str, dict[str, list[str]]]:
    """{stage: {'deps': [...], 'outs': [...], 'params': [file, ...]}} from dvc.yaml."""
    stages = yaml.load(dvc_yaml.read_text(), Loader=yaml.CSafeLoader)["stages"]

    def paths(items):
        return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]

    return {name: {"deps": paths(s.get("deps")), "outs": paths(s.get("outs")),
                   "params": [p.rstrip(":") for p in paths(s.get("params"))]} for name, s in stages.items()}


def _inside(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def plan(stages: list[str], configs: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]],
         root: Path = ROOT) -> list[StagePlan]:
    """Which of `stages` (in pipeline order) a run with `overrides` would rerun, and why.

    configs: each stage's resolved config (defaults < YAML < overrides). A stage reruns when it is
    not in dvc.lock, DVC finds a dep changed or an out missing, its params (its YAML with the
    overrides) differ from those dvc.lock recorded, or a stage whose outputs it reads reruns.
    """
    from dvc.utils.serialize import parse_yaml

    def dvc_yaml(path: Path) -> dict[str, Any]:
        # as DVC reads them (ruamel, YAML 1.2): PyYAML reads dvc.lock's `no` as False and 5e-05 as a string
        return (parse_yaml(path.read_text(), str(path)) or {}) if path.exists() else {}

    lock, graph = dvc_yaml(root / "dvc.lock").get("stages", {}), stage_graph(root / "dvc.yaml")
    status = _dvc_status([s for s in stages if s in lock], root)
    plans = {s: StagePlan(s) for s in stages}
    for s in stages:
        p = plans[s]
        if s not in lock:
            p.reasons.append("never run (not in dvc.lock)")
            continue
        for item in status.get(s, []):
            if isinstance(item, str):
                p.reasons.append(item)  # "always changed"
                continue
            for kind, changes in item.items():
                for path, what in changes.items():
                    if isinstance(what, str):  # a file dep or out; params are compared below, overrides included
                        p.reasons.append(f"{kind.removeprefix('changed ').rstrip('s')} {path} {what}")
        for pfile in graph[s]["params"]:
            old = lock[s].get("params", {}).get(pfile, {})
            new = {**dvc_yaml(root / pfile), **overrides.get(s, {})}
            p.reasons.extend(_params_diff(old, new))
    # DVC compares each stage with dvc.lock alone; a rerun upstream makes new outputs downstream reads
    for s in stages:
        for up in stages[:stages.index(s)]:
            if plans[up].runs and any(_inside(d, o) for d in graph[s]["deps"] for o in graph[up]["outs"]):
                plans[s].reasons.append(f"upstream {up} reruns")
    for s in stages:
        if plans[s].runs and s in TRAINING and s in configs:
            plans[s].estimate = estimate(s, configs)
    return [plans[s] for s in stages]


# ----------------------------------------------------------------------------- time and memory of a training stage


def gpt_params(c: dict[str, Any]) -> int:
    """Parameter count of models/gpt.py GPT for GPTConfig fields `c` (tied weights counted once)."""
    d, V, L = c["n_embd"], c["vocab_size"], c["n_layer"]
    hd, kv = d // c["n_head"], c["n_kv_heads"] or c["n_head"]
    b = bool(c["bias"])
    hidden = 64 * math.ceil(8 * d / 3 / 64) if c["mlp"] == "swiglu" else 4 * d
    norm = d * (2 if c["norm"] == "layernorm" and b else 1)
    attn = d * (c["n_head"] + 2 * kv) * hd + b * (c["n_head"] + 2 * kv) * hd + c["n_head"] * hd * d + b * d
    mlp = (2 if c["mlp"] == "swiglu" else 1) * (d * hidden + b * hidden) + hidden * d + b * d
    n = V * d + L * (2 * norm + attn + mlp) + norm
    if c["pos_encoding"] == "learned":
        n += c["block_size"] * d
    if not c["tie_weights"]:
        n += V * d
    return n


def throughput() -> dict[str, Any]:
    """FLOP/s this machine reaches: training at bench_gpt's measured peak x MFU, decoding at
    bench_decode's measured tokens/s; without those results, a 1024^2 numpy matmul probe at an
    assumed 40% (training) and 10% (decoding) of it."""
    out: dict[str, Any] = {}
    gpt, dec = ROOT / "bench" / "results" / "gpt.json", ROOT / "bench" / "results" / "decode.json"
    try:
        g = json.loads(gpt.read_text())
        # two formats: peak_flops_fp32.best (the best of several matmul sizes) or peak_flops.fp32
        peak = g["peak_flops_fp32"]["best"] if "peak_flops_fp32" in g else g["peak_flops"]["fp32"]
        # an MFU above 1 means the peak was measured under more load than the training steps: cap it
        mfu = min(1.0, max(r["mfu"] for r in g["runs"] if r.get("model") == "ours" and r.get("dtype", "fp32") == "fp32"))
        out.update(peak=peak, train=peak * mfu, source=f"bench/results/gpt.json (peak {peak / 1e9:.0f} GFLOP/s, "
                   f"MFU {mfu:.0%})")
    except (OSError, KeyError, ValueError, TypeError):
        import time

        import numpy as np

        a = np.random.rand(1024, 1024).astype(np.float32)
        a @ a
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        peak = 3 * 2 * 1024 ** 3 / (time.perf_counter() - t0)
        out.update(peak=peak, train=0.4 * peak, source=f"a numpy 1024^2 matmul probe ({peak / 1e9:.0f} GFLOP/s; "
                   "assumed MFU 40%: bench/results/gpt.json missing or unreadable)")
    out["decode"] = 0.1 * out["peak"]
    try:
        d = json.loads(dec.read_text())
        row = max((r for r in d["rows"] if r["case"] == "greedy"), key=lambda r: r["batch"])
        tiny = gpt_params(gpt_config({"preset": "tiny"}))
        out["decode"] = row["ours_tokens_per_s"] * 2 * tiny
        out["source"] += f"; decoding {row['ours_tokens_per_s']:.0f} tok/s of tiny at batch {row['batch']} " \
                         "(bench/results/decode.json)"
    except (OSError, KeyError, ValueError, TypeError):
        out["source"] += "; decoding at an assumed 10% of peak"
    return out


def available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def estimate(stage: str, configs: dict[str, dict[str, Any]], rate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Wall time and peak memory of a training stage from its config, on this machine.

    FLOPs: 6 N per trained token (N counts the tied embedding, so the vocab head is in) plus
    attention's 12 L d T (nanoGPT's estimate, T the context); 2 N per token of forward-only work
    (reference and reward scoring); decoding at the measured decoding rate. Chat sequences are
    counted at the full context (an upper bound: batches pad to their longest conversation).
    Not counted: evaluations, checkpoints, data loading. Memory: weights + grads + AdamW's two
    moments (16 bytes per trained fp32 parameter), 4 bytes per frozen one, the activations autograd
    keeps (per token and layer ~ 12 d + 3 hidden + 2 n_head T floats), and the process itself.
    """
    rate = rate or throughput()
    pre = configs["pretrain"]
    arch = gpt_config({"preset": pre["preset"], "vocab_size": configs["tokenizer"]["vocab_size"],
                       **{k: pre[k] for k in ("block_size", "pos_encoding", "norm", "mlp", "n_kv_heads", "dropout")}})
    n, L, d, T = gpt_params(arch), arch["n_layer"], arch["n_embd"], arch["block_size"]
    hidden = 64 * math.ceil(8 * d / 3 / 64) if arch["mlp"] == "swiglu" else 4 * d
    per_token_train = 6 * n + 12 * L * d * T
    act_per_token = 4 * (L * (12 * d + 3 * hidden + 2 * arch["n_head"] * T) + 2 * d)
    c = configs[stage]
    train_tokens = fwd_tokens = gen_tokens = 0
    trained, frozen = n, 0
    if stage == "pretrain":
        micro = c["batch_size"] * T
        train_tokens = c["max_steps"] * c["grad_accum"] * micro
    elif stage == "sft":
        micro = c["batch_size"] * T
        train_tokens = c["max_steps"] * micro
    elif stage == "reward":
        micro = 2 * c["batch_size"] * T  # chosen and rejected
        train_tokens = c["max_steps"] * micro
        gen_tokens = c["sampled_prompts"] * c["max_new_tokens"]  # the SFT model's sampled replies, once
        trained = n + d + 1
    elif c["algorithm"] == "dpo":
        micro = 2 * c["batch_size"] * T
        train_tokens = c["max_steps"] * micro
        fwd_tokens = train_tokens  # the frozen reference scores the same pairs
        frozen = n
    else:  # ppo: sample, score with reference + reward model + old policy, then ppo_epochs of updates (+ ptx)
        updates = c["ppo_epochs"] * c["rollout_batch"] // c["minibatch_size"]
        micro = c["minibatch_size"] * T * (2 if c["ptx_coef"] else 1)
        gen_tokens = c["max_steps"] * c["rollout_batch"] * c["max_new_tokens"]
        fwd_tokens = c["max_steps"] * 3 * c["rollout_batch"] * T
        train_tokens = c["max_steps"] * updates * micro
        trained, frozen = n + d + 1, 2 * n + d + 1  # policy + value head; reference and reward model
    flops = train_tokens * per_token_train + fwd_tokens * 2 * n
    seconds = flops / rate["train"] + gen_tokens * 2 * n / rate["decode"]
    memory = 16 * trained + 4 * frozen + micro * act_per_token + PROCESS_BYTES
    avail = available_bytes()
    return {"params": n, "tokens_trained": train_tokens, "tokens_decoded": gen_tokens, "flops": flops,
            "seconds": seconds, "peak_bytes": memory, "available_bytes": avail, "fits": memory < avail,
            "throughput": rate["source"]}


# ----------------------------------------------------------------------------- the command


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_plan(plans: list[StagePlan]) -> str:
    lines, runs = [], [p for p in plans if p.runs]
    for p in plans:
        if not p.runs:
            lines.append(f"{p.stage:>10}: up to date (skipped)")
            continue
        lines.append(f"{p.stage:>10}: WOULD RUN: {'; '.join(p.reasons)}")
        e = p.estimate
        if e:
            lines.append(f"{'':>12}estimate: {e['params'] / 1e6:.2f}M params, {e['tokens_trained'] / 1e6:.2f}M tokens "
                         f"trained, {e['tokens_decoded'] / 1e3:.0f}k decoded, {e['flops'] / 1e12:.1f} TFLOP: "
                         f"~{_duration(e['seconds'])}, peak memory ~{_gb(e['peak_bytes'])} "
                         f"(available {_gb(e['available_bytes'])})")
            if not e["fits"]:
                lines.append(f"{'':>12}WARNING: {p.stage} would need ~{_gb(e['peak_bytes'])}, more than the "
                             f"{_gb(e['available_bytes'])} available: lower batch_size or the model size")
    if any(p.estimate for p in plans):
        lines.append(f"throughput: {next(p.estimate for p in plans if p.estimate)['throughput']}")
    lines.append(f"{len(runs)} of {len(plans)} stages would run" if runs else "nothing would run: every stage is up to date")
    return "\n".join(lines)


def split_overrides(items: list[str], stages: list[str]) -> dict[str, dict[str, Any]]:
    """['pretrain.max_steps=9'] -> {'pretrain': {'max_steps': 9}}, as the flow reads them."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in parse_overrides(items).items():
        stage, _, name = key.partition(".")
        if stage not in stages or not name:
            raise ConfigError(f"override {key!r}: expected <stage>.<key> with a stage of {stages}")
        nested.setdefault(stage, {})[name] = value
    return nested


def plan_pipeline(pipeline: str, items: list[str]) -> list[StagePlan]:
    """The plan of flows/<pipeline>.py with `stage.key=value` overrides (applied in memory only)."""
    specs = flow_stages(ROOT / "flows" / f"{pipeline}.py")
    overrides = split_overrides(items, list(specs))
    configs = {s: resolve_static(s, static_dataclass(*spec), overrides.get(s, {})) for s, spec in specs.items()}
    return plan(list(specs), configs, overrides)
