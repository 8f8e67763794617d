"""mt_eval: the fine-tuned model on the held-out documents, greedy and beam search, per direction.

For each direction (en->fr, en->es) a fixed sample of `max_sentences` test pairs (the test split
holds whole documents no train pair comes from) is translated greedily and by beam search (width
and length penalty from the config) and scored against the reference: corpus BLEU and chrF
(sacrebleu), ROUGE-L F1 and METEOR (forgeline/metrics.py). METEOR's stemmer and synonyms are
English-only (nltk's Porter stemmer, WordNet): on French and Spanish it matches exact words only.
The report lists the best and worst sentences of the beam output by sentence chrF.

Writes data/mt_eval/metrics.json, translations.parquet and report.md.

    python -m tasks.mt_eval [key=value ...]
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from prefect import task
from safetensors.torch import load_model

from forgeline import metrics
from forgeline.chat import load_tokenizer
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.workspace import run_stage
from models.seq2seq import Seq2Seq, Seq2SeqConfig, translate


@dataclass
class MTEvalConfig:
    model_dir: str = "data/mt_train"        # model folder: config.json, model.safetensors, tokenizer.json
    pairs: str = "data/mt_data/pairs.parquet"
    out_dir: str = "data/mt_eval"
    split: str = "test"
    max_sentences: int = 300                # per direction, a fixed sample (seed)
    beam_width: int = 4
    length_penalty: float = 0.6             # GNMT's alpha
    batch_size: int = 32
    examples: int = 5                       # best and worst sentences listed in the report
    seed: int = 0

    def check(self) -> None:
        if self.max_sentences < 1 or self.beam_width < 1 or self.batch_size < 1 or self.examples < 0:
            raise ConfigError("mt_eval: max_sentences, beam_width, batch_size >= 1 and examples >= 0")
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"mt_eval: split={self.split!r}: train, val or test")


def load_folder(path: str | Path) -> tuple[Seq2Seq, object]:
    """A seq2seq model folder (no pickle) in eval mode, and its tokenizer."""
    path = Path(path)
    model = Seq2Seq(Seq2SeqConfig(**json.loads((path / "config.json").read_text())))
    load_model(model, str(path / "model.safetensors"))
    return model.eval(), load_tokenizer(path / "tokenizer.json")


def scores(hyps: list[str], refs: list[str]) -> dict[str, float]:
    import sacrebleu

    wrapped = [[r] for r in refs]
    return {"bleu": metrics.bleu(hyps, wrapped), "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "rougeL": metrics.rouge(hyps, wrapped, types=("rougeL",))["rougeL"],
            "meteor": metrics.meteor(hyps, wrapped)}


def mt_eval(cfg: MTEvalConfig) -> dict:
    import sacrebleu

    torch.manual_seed(cfg.seed)
    model, tok = load_folder(cfg.model_dir)
    pairs = pd.read_parquet(cfg.pairs)
    pairs = pairs[(pairs["split"] == cfg.split) & pairs["tgt_lang"].isin(model.config.lang_ids)]
    result, rows = {}, []
    for lang, part in pairs.groupby("tgt_lang", sort=True):
        part = part.sample(min(cfg.max_sentences, len(part)), random_state=cfg.seed).sort_values("pair_id")
        src, ref = part["src"].tolist(), part["tgt"].tolist()
        direction = f"en-{lang}"
        result[direction] = {"sentences": len(src)}
        out = {}
        for mode, width in (("greedy", 1), ("beam", cfg.beam_width)):
            t0 = time.perf_counter()
            out[mode], conf = translate(model, tok, src, lang, width, cfg.length_penalty, cfg.batch_size)
            seconds = time.perf_counter() - t0
            result[direction][mode] = {**scores(out[mode], ref), "sentences_per_s": len(src) / seconds,
                                       "mean_confidence": sum(conf) / len(conf)}
            out[f"{mode}_confidence"] = conf
        for i in range(len(src)):
            rows.append({"direction": direction, "pair_id": part["pair_id"].iloc[i], "src": src[i], "ref": ref[i],
                         "greedy": out["greedy"][i], "beam": out["beam"][i],
                         "beam_confidence": out["beam_confidence"][i],
                         "beam_chrf": sacrebleu.sentence_chrf(out["beam"][i], [ref[i]]).score})
    table = pd.DataFrame(rows)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out_dir / "translations.parquet", index=False)
    summary = {"model_dir": cfg.model_dir, "split": cfg.split, "beam_width": cfg.beam_width,
               "length_penalty": cfg.length_penalty, "directions": result}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "report.md").write_text(report(summary, table, cfg.examples))
    return summary


def report(summary: dict, table: pd.DataFrame, k: int) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# mt_eval: {summary['split']} split, beam width {summary['beam_width']}, "
             f"length penalty {summary['length_penalty']}", "",
             "| direction | decoding | sentences | BLEU | chrF | ROUGE-L | METEOR | sentences/s |", "|---|---|---|---|---|---|---|---|"]
    for direction, r in summary["directions"].items():
        for mode in ("greedy", "beam"):
            m = r[mode]
            lines.append(f"| {direction} | {mode} | {r['sentences']} | {m['bleu']:.2f} | {m['chrf']:.2f} | "
                         f"{m['rougeL']:.3f} | {m['meteor']:.3f} | {m['sentences_per_s']:.1f} |")
    for direction, part in table.groupby("direction", sort=True):
        ranked = part.sort_values("beam_chrf", kind="stable")
        for title, rows in ((f"best {k}", ranked.iloc[::-1][:k]), (f"worst {k}", ranked[:k])):
            lines += ["", f"## {direction}: the {title} beam translations by sentence chrF", "",
                      "| chrF | confidence | source | reference | beam |", "|---|---|---|---|---|"]
            lines += [f"| {r.beam_chrf:.1f} | {r.beam_confidence:.2f} | {cell(r.src)} | {cell(r.ref)} | {cell(r.beam)} |"
                      for r in rows.itertuples()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(MTEvalConfig, "mt_eval", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = mt_eval(cfg)
        mlflow.log_metrics({f"{d}.{mode}.{k}": v for d, r in summary["directions"].items()
                            for mode in ("greedy", "beam") for k, v in r[mode].items()})
        for name in ("metrics.json", "report.md"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print((Path(cfg.out_dir) / "report.md").read_text().split("\n## ")[0])


@task(name="mt_eval", task_run_name="{stage}")
def mt_eval_task(run: dict[str, str], stage: str = "mt_eval") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
