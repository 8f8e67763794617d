"""compose_eval: how good and how often the phrase generator's suggestions are; the served model folder.

On the held-out (prefix, completion) pairs of compose_data, with forgeline/compose.py's generator
(beam search, whole-word cut, the settings below):

- **perplexity** of the fine-tuned and of the general (base) model on the test split's domain text;
- **precision/coverage curve** of the confidence filter on the *val* pairs: coverage = share of
  pairs shown a suggestion (its mean log-probability per token >= the threshold), precision =
  share of those exactly right (its words are the next words of the true completion);
- the **threshold**: the highest that still reaches `target_coverage` on val, written with the
  decoding settings to compose.json in the served model folder (out_dir/model/);
- **ExactMatch@N** (N = 1..5 words) on the *test* pairs: of the suggestions shown with at least N
  words, the share whose first N words are the completion's (and, unfiltered, the share of all
  pairs), with the coverage they were measured at;
- **saved keystrokes**: test sentences typed key by key; where the service's triggering rules
  fire (word boundary, minimum prefix) and the suggestion passes the threshold, a right one is
  accepted with one key (Tab); saved = 1 - keys pressed / characters typed.

    python -m tasks.compose_eval [key=value ...]
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task

from forgeline.compose import SENTENCE_END, Composer, ComposeSettings, should_trigger
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.workspace import run_stage

MAX_N = 5


@dataclass
class ComposeEvalConfig:
    model_dir: str = "data/compose_finetune"   # the fine-tuned model folder
    base_dir: str = "data/compose_pretrain"    # the general model, for the perplexity comparison
    data_dir: str = "data/compose_data"        # pairs.parquet, domain.parquet
    out_dir: str = "data/compose_eval"         # metrics.json, curve.json, precision_coverage.png, report.md, model/
    num_beams: int = 4
    max_new_tokens: int = 8
    max_words: int = 5
    context_tokens: int = 96
    window_stride: int = 32
    min_prefix_words: int = 3
    debounce_ms: int = 150                     # the service's; the simulated typist pauses at word ends
    target_coverage: float = 0.3               # share of val pairs to show a suggestion
    sim_sentences: int = 120                   # test sentences typed for saved keystrokes
    seed: int = 1337

    def check(self) -> None:
        if not 0 < self.target_coverage <= 1:
            raise ConfigError("compose_eval: need 0 < target_coverage <= 1")
        if self.sim_sentences < 1:
            raise ConfigError("compose_eval: sim_sentences must be >= 1")

    def settings(self) -> ComposeSettings:
        return ComposeSettings(num_beams=self.num_beams, max_new_tokens=self.max_new_tokens, max_words=self.max_words,
                               context_tokens=self.context_tokens, window_stride=self.window_stride,
                               min_prefix_words=self.min_prefix_words, debounce_ms=self.debounce_ms)


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp(mean next-token loss) over the texts cut into consecutive block_size windows."""
    ids = [t for e in tokenizer.encode_batch(texts, add_special_tokens=False) for t in e.ids + [1]]
    block = model.config.block_size
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, block):
        x = torch.tensor([ids[s:s + block]])
        y = torch.tensor([ids[s + 1:s + block + 1]])
        x = x[:, :y.size(1)]
        _, loss = model(x, y)
        total, count = total + loss.item() * y.numel(), count + y.numel()
    return math.exp(total / count)


def right_words(suggestion: str, completion: str) -> int:
    """How many leading words of the suggestion are the completion's next words (all of them: exact)."""
    n = 0
    for s, c in zip(suggestion.split(), completion.split()):
        if s != c:
            break
        n += 1
    return n


def suggest_pairs(composer: Composer, pairs: pd.DataFrame) -> list[tuple[str | None, float]]:
    """(suggestion or None, score) per pair; a pair without a suggestion scores -inf."""
    out = []
    for prefix in pairs["prefix"]:
        proposal, _, _ = composer.propose(prefix)
        out.append((proposal.text, proposal.score) if proposal else (None, -math.inf))
    return out


def curve(results: list[tuple[str | None, float]], completions: list[str]) -> list[dict]:
    """Precision and coverage at every threshold that changes them (each pair's score), best first."""
    rows = sorted(((score, right_words(s, c) == len(s.split())) for (s, score), c in zip(results, completions)
                   if s is not None), key=lambda r: -r[0])
    out, right = [], 0
    for k, (score, ok) in enumerate(rows, 1):
        right += ok
        out.append({"threshold": score, "coverage": k / len(results), "precision": right / k})
    return out


def tune_threshold(points: list[dict], target: float) -> float:
    """The highest threshold reaching `target` coverage (the lowest score when none does)."""
    if not points:
        return math.inf
    return next((p["threshold"] for p in points if p["coverage"] >= target - 1e-12), points[-1]["threshold"])


def exact_match(results, completions, threshold: float) -> dict:
    """ExactMatch@N for N = 1..MAX_N: shown (score >= threshold, >= N words) and unfiltered (all pairs)."""
    out = {"coverage": sum(s is not None and sc >= threshold for s, sc in results) / len(results)}
    for n in range(1, MAX_N + 1):
        shown = [(s, c) for (s, sc), c in zip(results, completions)
                 if s is not None and sc >= threshold and len(s.split()) >= n]
        out[f"exact_match@{n}"] = sum(right_words(s, c) >= n for s, c in shown) / len(shown) if shown else float("nan")
        out[f"shown@{n}"] = len(shown)
        out[f"exact_match@{n}_all"] = sum(s is not None and len(s.split()) >= n and right_words(s, c) >= n
                                         for (s, _), c in zip(results, completions)) / len(results)
    return out


def typing_items(domain: pd.DataFrame, n: int, seed: int, context_chars: int = 400) -> list[tuple[str, str]]:
    """(paragraph so far, sentence) for n test sentences of 4+ words, a seeded sample."""
    items = []
    for text in domain.loc[domain["split"] == "test", "text"]:
        for para in text.split("\n\n"):
            done = 0
            for sent in (s for s in _sentences(para) if s):
                start = para.index(sent, done)
                done = start + len(sent)
                if len(sent.split()) >= 4:
                    items.append((para[max(0, start - context_chars):start], sent))
    random.Random(seed).shuffle(items)
    return items[:n]


def _sentences(paragraph: str) -> list[str]:
    out, last = [], 0
    for m in SENTENCE_END.finditer(paragraph):
        out.append(paragraph[last:m.end()].strip())
        last = m.end()
    return out + [paragraph[last:].strip()]


def simulate_typing(composer: Composer, items: list[tuple[str, str]], threshold: float) -> dict:
    """Type each sentence key by key; a right suggestion shown at a trigger point is taken with Tab."""
    s = composer.settings
    keys = chars = triggers = shown = accepted = 0
    for context, sentence in items:
        pos, cache = 0, None
        while pos < len(sentence):
            prefix = context + sentence[:pos]
            if pos > 0 and should_trigger(prefix, "type", s.debounce_ms, s)[0]:
                triggers += 1
                proposal, cache, _ = composer.propose(prefix, cache)
                if proposal and proposal.score >= threshold:
                    shown += 1
                    rest, text = sentence[pos:], proposal.text
                    if rest.startswith(text) and (len(rest) == len(text) or not rest[len(text)].isalnum()):
                        accepted += 1
                        keys += 1          # Tab
                        pos += len(text)
                        continue
            keys += 1
            pos += 1
        chars += len(sentence)
    return {"saved_keystrokes": 1 - keys / chars, "typed_chars": chars, "keys": keys, "triggers": triggers,
            "shown": shown, "accepted": accepted, "trigger_coverage": shown / max(1, triggers),
            "acceptance": accepted / max(1, shown)}


def plot_curve(points: list[dict], threshold: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([p["coverage"] for p in points], [p["precision"] for p in points], lw=1.5)
    chosen = next((p for p in points if p["threshold"] <= threshold), points[-1]) if points else None
    if chosen:
        ax.plot(chosen["coverage"], chosen["precision"], "o",
                label=f"threshold {threshold:.2f}: coverage {chosen['coverage']:.2f}, precision {chosen['precision']:.2f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("coverage (share of val pairs shown a suggestion)")
    ax.set_ylabel("precision (suggestion exactly right)")
    ax.set_title("confidence filter: precision vs coverage (val)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- the stage


def compose_eval(cfg: ComposeEvalConfig) -> dict:
    from forgeline.checkpoint import load_model_folder

    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    served = out / "model"
    served.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        shutil.copy2(Path(cfg.model_dir) / name, served / name)
    composer = Composer.load(served, **asdict(cfg.settings()))
    pairs = pd.read_parquet(Path(cfg.data_dir) / "pairs.parquet")
    domain = pd.read_parquet(Path(cfg.data_dir) / "domain.parquet")

    test_text = domain.loc[domain["split"] == "test", "text"].tolist()
    metrics = {"perplexity": perplexity(composer.model, composer.tokenizer, test_text),
               "perplexity_base": perplexity(load_model_folder(cfg.base_dir), composer.tokenizer, test_text)}

    val, test = pairs[pairs["split"] == "val"], pairs[pairs["split"] == "test"]
    val_results = suggest_pairs(composer, val)
    points = curve(val_results, val["completion"].tolist())
    threshold = tune_threshold(points, cfg.target_coverage)
    composer.settings = replace(composer.settings, threshold=threshold)
    composer.save_settings(served, tuned_on="val pairs", target_coverage=cfg.target_coverage)
    val_at = exact_match(val_results, val["completion"].tolist(), threshold)
    test_results = suggest_pairs(composer, test)
    test_at = exact_match(test_results, test["completion"].tolist(), threshold)
    typing = simulate_typing(composer, typing_items(domain, cfg.sim_sentences, cfg.seed), threshold)
    metrics.update({"threshold": threshold, "val_coverage": val_at["coverage"],
                    "val_precision": _precision(val_results, val, threshold),
                    **{f"test_{k}": v for k, v in test_at.items()}, **typing,
                    "val_pairs": len(val), "test_pairs": len(test)})

    (out / "curve.json").write_text(json.dumps(points))
    plot_curve(points, threshold, out / "precision_coverage.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(report(metrics, cfg))
    examples = [{"prefix": p[-80:], "completion": c, "suggestion": s, "score": sc}
                for p, c, (s, sc) in zip(test["prefix"], test["completion"], test_results) if s is not None][:20]
    (out / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")
    return metrics


def _precision(results, pairs: pd.DataFrame, threshold: float) -> float:
    shown = [(s, c) for (s, sc), c in zip(results, pairs["completion"]) if s is not None and sc >= threshold]
    return sum(right_words(s, c) == len(s.split()) for s, c in shown) / len(shown) if shown else float("nan")


def report(m: dict, cfg: ComposeEvalConfig) -> str:
    em = " | ".join(f"{m[f'test_exact_match@{n}']:.1%} ({m[f'test_shown@{n}']})" for n in range(1, MAX_N + 1))
    em_all = " | ".join(f"{m[f'test_exact_match@{n}_all']:.1%}" for n in range(1, MAX_N + 1))
    return (f"# compose_eval\n\n"
            f"Perplexity on the test split's letters/dialogue: fine-tuned **{m['perplexity']:.1f}**, "
            f"general model {m['perplexity_base']:.1f}.\n\n"
            f"Threshold (mean log-probability per token) **{m['threshold']:.3f}**, tuned on {m['val_pairs']} val pairs "
            f"to coverage {cfg.target_coverage:.0%}: val coverage {m['val_coverage']:.1%}, precision "
            f"{m['val_precision']:.1%}. Test coverage at it: **{m['test_coverage']:.1%}** of {m['test_pairs']} pairs.\n\n"
            f"| ExactMatch@N | 1 | 2 | 3 | 4 | 5 |\n|---|---|---|---|---|---|\n"
            f"| shown (count) | {em} |\n| all pairs, unfiltered | {em_all} |\n\n"
            f"Saved keystrokes: **{m['saved_keystrokes']:.1%}** over {m['typed_chars']} typed characters "
            f"({m['triggers']} trigger points, {m['shown']} suggestions shown = {m['trigger_coverage']:.1%}, "
            f"{m['accepted']} accepted).\n\n![precision/coverage](precision_coverage.png)\n")


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(ComposeEvalConfig, "compose_eval", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        metrics = compose_eval(cfg)
        mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and np.isfinite(v)})
        out = Path(cfg.out_dir)
        for name in ("precision_coverage.png", "report.md", "metrics.json", "curve.json", "examples.json"):
            mlflow.log_artifact(str(out / name))
        mlflow.log_artifact(str(out / "model" / "compose.json"), artifact_path="model")
    print((Path(cfg.out_dir) / "report.md").read_text())


@task(name="compose_eval", task_run_name="{stage}")
def compose_eval_task(run: dict[str, str], stage: str = "compose_eval") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
