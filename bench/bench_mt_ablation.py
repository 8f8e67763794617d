"""Does MLM pretraining earn its compute? mt_train's fine-tuning from mt_pretrain's weights against the
same architecture from random init: same pairs, same steps, same schedule, seeds 1 and 2 each.

Each run is mt_train (in process, no MLflow) with init and seed set and its folders under
checkpoints/mt_ablation/<init>-s<seed>/ (resumable), then greedy decoding of the first
`--sentences` held-out pairs per direction, scored by BLEU and chrF, plus the held-out loss.
Runs are separate commands so each fits a short slot of the shared lock; --report gathers them.
Needs the pipeline's data/mt_data, data/mt_validate and data/mt_pretrain (forgeline run translate).

    flock /tmp/forgeline-heavy.lock .venv/bin/python -m bench.bench_mt_ablation --run pretrained:1 [--steps 1000]
    ... --run random:1, pretrained:2, random:2
    .venv/bin/python -m bench.bench_mt_ablation --report
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pandas as pd
import sacrebleu
import torch

from bench import machine, write_result
from forgeline.config import load_config
from models.seq2seq import translate
from tasks.mt_eval import load_folder
from tasks.mt_train import MTTrainConfig, mt_train

ROOT = Path("checkpoints/mt_ablation")
GRID = [(init, seed) for seed in (1, 2) for init in ("pretrained", "random")]


def run(init: str, seed: int, steps: int, sentences: int) -> dict:
    folder = ROOT / f"{init}-s{seed}"
    cfg = load_config(MTTrainConfig, "mt_train", {"init": init, "seed": seed, "max_steps": steps,
                                                  "out_dir": str(folder / "model"), "ckpt_dir": str(folder / "ckpt"),
                                                  "eval_interval": max(1, steps // 4), "ckpt_interval": max(1, steps // 4)})
    summary = mt_train(cfg)
    model, tok = load_folder(folder / "model")
    pairs = pd.read_parquet(cfg.pairs)
    result = {"init": init, "seed": seed, "steps": steps, "val_loss": summary["val_loss"],
              "val_loss_at_start": summary["val_loss_at_start"], "train_seconds": summary["train_seconds"]}
    for lang in sorted(model.config.lang_ids.keys() - {"en"}):
        test = pairs[(pairs["split"] == "test") & (pairs["tgt_lang"] == lang)].sort_values("pair_id")[:sentences]
        hyps, _ = translate(model, tok, test["src"].tolist(), lang, beam=1)
        refs = [test["tgt"].tolist()]
        result[f"en-{lang}"] = {"bleu": sacrebleu.corpus_bleu(hyps, refs).score,
                                "chrf": sacrebleu.corpus_chrf(hyps, refs).score, "sentences": len(hyps)}
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report() -> None:
    found = [json.loads(p.read_text()) for p in sorted(ROOT.glob("*/result.json"))]
    if not found:
        raise SystemExit(f"no runs under {ROOT}: run --run init:seed first")
    directions = sorted(k for k in found[0] if k.startswith("en-"))
    rows = []
    for init in ("pretrained", "random"):
        runs = [r for r in found if r["init"] == init]
        if not runs:
            continue
        row = {"init": init, "seeds": [r["seed"] for r in runs], "steps": runs[0]["steps"],
               "val_loss": statistics.mean(r["val_loss"] for r in runs),
               "val_loss_at_start": statistics.mean(r["val_loss_at_start"] for r in runs)}
        for d in directions:
            for metric in ("bleu", "chrf"):
                values = [r[d][metric] for r in runs]
                row[f"{d}.{metric}"] = statistics.mean(values)
                row[f"{d}.{metric}.per_seed"] = [round(v, 2) for v in values]
        rows.append(row)
    print("| init | seeds | steps | held-out loss (start -> end) | " + " | ".join(
        f"{d} BLEU | {d} chrF" for d in directions) + " |")
    print("|---|---|---|---|" + "---|---|" * len(directions))
    for r in rows:
        cells = " | ".join(f"{r[f'{d}.bleu']:.2f} ({', '.join(map(str, r[f'{d}.bleu.per_seed']))}) | "
                           f"{r[f'{d}.chrf']:.2f} ({', '.join(map(str, r[f'{d}.chrf.per_seed']))})" for d in directions)
        print(f"| {r['init']} | {r['seeds']} | {r['steps']} | {r['val_loss_at_start']:.3f} -> {r['val_loss']:.3f} | {cells} |")
    out = write_result("mt_ablation", {"runs": found, "rows": rows})
    print(f"\nwrote {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="init:seed, e.g. pretrained:1")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.run:
        init, seed = args.run.split(":")
        print(json.dumps(run(init, int(seed), args.steps, args.sentences), indent=2))
        print(f"machine: {machine()}")
    if args.report:
        report()


if __name__ == "__main__":
    main()
