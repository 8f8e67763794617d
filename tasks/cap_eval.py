"""cap_eval: every cap_train variant on the held-out combinations, greedy and beam search.

For each variant (data/cap_train/<variant>/) the test scenes (each holds a (shape, colour) pair no
training scene has) and, for contrast, the val scenes (seen combinations) are captioned greedily and
by beam search, and scored against their reference captions: CIDEr-D, BLEU-4 and METEOR
(forgeline/metrics.py), and the attribute accuracy of the caption against the structured label
(forgeline/scenes.py's `attribute_scores`: the (colour, shape) objects named exactly, shapes,
colours, sizes and count each alone), plus `novel_named`: the share of test scenes whose caption
names the held-out pair itself. The report is the table, the best variant's examples and an image
strip of them (examples.png).

Writes data/cap_eval/metrics.json, captions.parquet, report.md and examples.png.

    python -m tasks.cap_eval [key=value ...]
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task
from safetensors.torch import load_model

from forgeline import metrics, scenes
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.images import load_images, to_tensor
from forgeline.workspace import run_stage
from models.caption import CaptionConfig, CaptionModel, caption

ATTRIBUTES = ("objects", "shapes", "colours", "sizes", "count")


@dataclass
class CapEvalConfig:
    model_dir: str = "data/cap_train"          # one folder per variant, as cap_train wrote them
    manifest: str = "data/img_data/manifest.parquet"
    out_dir: str = "data/cap_eval"
    splits: list[str] = field(default_factory=lambda: ["test", "val"])  # held-out pairs first: the table's figures
    max_images: int = 500                      # per split, a fixed sample (seed)
    beam_width: int = 4
    length_penalty: float = 0.6
    batch_size: int = 100
    examples: int = 8
    seed: int = 0

    def check(self) -> None:
        if self.max_images < 1 or self.beam_width < 2 or self.batch_size < 1 or self.examples < 0:
            raise ConfigError("cap_eval: max_images, batch_size >= 1, beam_width >= 2, examples >= 0")
        if not set(self.splits) <= {"train", "val", "test"}:
            raise ConfigError(f"cap_eval: splits={self.splits}: train, val, test")


def load_folder(path: str | Path) -> tuple[CaptionModel, list[str]]:
    """A caption model folder (no pickle) in eval mode, and its vocabulary."""
    path = Path(path)
    model = CaptionModel(CaptionConfig(**json.loads((path / "config.json").read_text())))
    load_model(model, str(path / "model.safetensors"))
    return model.eval(), json.loads((path / "vocab.json").read_text())


def variants(model_dir: str | Path) -> list[str]:
    """The variant folders cap_train wrote under model_dir, in the table's order (cnn, then vit-*)."""
    found = [p.parent.name for p in Path(model_dir).glob("*/model.safetensors")]
    if not found:
        raise FileNotFoundError(f"{model_dir}: no variant folder with a model.safetensors; run cap_train")
    return sorted(found, key=lambda v: (v != "cnn", v))


def held_out_pairs(objects: list[dict], held: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(o["shape"], o["colour"]) for o in objects if (o["shape"], o["colour"]) in held]


def score(hyps: list[str], refs: list[list[str]], objects: list[list[dict]], held: set) -> dict[str, float]:
    attr = [scenes.attribute_scores(h, o) for h, o in zip(hyps, objects)]
    out = {"cider": metrics.cider(hyps, refs), "bleu4": metrics.bleu(hyps, refs), "meteor": metrics.meteor(hyps, refs),
           **{f"attr_{a}": float(np.mean([s[a] for s in attr])) for a in ATTRIBUTES}}
    named = [all((c, s) in {(t[1], t[2]) for t in scenes.parse_caption(h)["objects"]} for s, c in held_out_pairs(o, held))
             for h, o in zip(hyps, objects) if held_out_pairs(o, held)]
    if named:
        out["novel_named"] = float(np.mean(named))
    return out


def cap_eval(cfg: CapEvalConfig) -> dict:
    torch.manual_seed(cfg.seed)
    manifest = pd.read_parquet(cfg.manifest)
    held = {tuple(p.split(":")) for p in json.loads((Path(cfg.manifest).parent / "summary.json").read_text())["held_out_pairs"]}
    data = {}
    for split in cfg.splits:
        part = manifest[(manifest["source"] == "scene") & (manifest["split"] == split)]
        part = part.sample(min(cfg.max_images, len(part)), random_state=cfg.seed).sort_values("index")
        data[split] = part
    result, rows = {}, []
    for variant in variants(cfg.model_dir):
        model, words = load_folder(Path(cfg.model_dir) / variant)
        size = model.config.image_size
        result[variant] = {}
        for split, part in data.items():
            images = to_tensor(load_images([f"scenes{size}.npz"] * len(part), part["index"].tolist(),
                                           Path(cfg.manifest).parent), size)
            refs, objects = [list(c) for c in part["captions"]], [json.loads(o) for o in part["objects"]]
            out = {}
            for mode, width in (("greedy", 1), ("beam", cfg.beam_width)):
                t0 = time.perf_counter()
                out[mode], _ = caption(model, words, images, width, cfg.length_penalty, cfg.batch_size)
                result[variant][f"{split}/{mode}"] = {**score(out[mode], refs, objects, held),
                                                      "images": len(part),
                                                      "images_per_s": len(part) / (time.perf_counter() - t0)}
            rows += [{"variant": variant, "split": split, "image_id": r.image_id, "index": r.index,
                      "greedy": g, "beam": b, "reference": r.captions[0]}
                     for r, g, b in zip(part.itertuples(), out["greedy"], out["beam"])]
    table = pd.DataFrame(rows)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out_dir / "captions.parquet", index=False)
    best = max(result, key=lambda v: result[v][f"{cfg.splits[0]}/beam"]["cider"])
    summary = {"splits": cfg.splits, "beam_width": cfg.beam_width, "length_penalty": cfg.length_penalty,
               "held_out_pairs": sorted(":".join(p) for p in held), "best_variant": best, "variants": result}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    examples = table[(table["variant"] == best) & (table["split"] == cfg.splits[0])].head(cfg.examples)
    if len(examples):
        strip = load_images(["scenes64.npz"] * len(examples), examples["index"].tolist(), Path(cfg.manifest).parent)
        from PIL import Image

        Image.fromarray(np.concatenate(list(strip), axis=1)).resize((128 * len(strip), 128), Image.NEAREST).save(
            out_dir / "examples.png")
    (out_dir / "report.md").write_text(report(summary, examples))
    return summary


def report(summary: dict, examples: pd.DataFrame) -> str:
    lines = [f"# cap_eval: beam width {summary['beam_width']}, length penalty {summary['length_penalty']}; "
             f"held-out pairs {', '.join(summary['held_out_pairs'])}", "",
             "| variant | split | decoding | images | CIDEr-D | BLEU-4 | METEOR | objects | shapes | colours | sizes | count "
             "| novel pair named | images/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, r in summary["variants"].items():
        for key, m in r.items():
            split, mode = key.split("/")
            novel = f"{m['novel_named']:.1%}" if "novel_named" in m else ""
            lines.append(f"| {variant} | {split} | {mode} | {m['images']} | {m['cider']:.3f} | {m['bleu4']:.1f} | "
                         f"{m['meteor']:.3f} | " + " | ".join(f"{m[f'attr_{a}']:.1%}" for a in ATTRIBUTES)
                         + f" | {novel} | {m['images_per_s']:.0f} |")
    if len(examples):
        lines += ["", f"## {summary['best_variant']}: examples (examples.png, left to right)", "",
                  "| image | beam | greedy | a reference |", "|---|---|---|---|"]
        lines += [f"| {r.image_id} | {r.beam} | {r.greedy} | {r.reference} |" for r in examples.itertuples()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(CapEvalConfig, "cap_eval", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = cap_eval(cfg)
        mlflow.log_metrics({f"{v}.{key.replace('/', '.')}.{k}": x for v, r in summary["variants"].items()
                            for key, m in r.items() for k, x in m.items()})
        for name in ("metrics.json", "report.md"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print((Path(cfg.out_dir) / "report.md").read_text().split("\n## ")[0])


@task(name="cap_eval", task_run_name="{stage}")
def cap_eval_task(run: dict[str, str], stage: str = "cap_eval") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
