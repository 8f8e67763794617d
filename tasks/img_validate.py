"""img_validate: the Great Expectations gate on the image manifest, before anything trains on it.

A GX 1.x suite on data/img_data/manifest.parquet plus columns derived here from the pixels
themselves: each row's array has the height, width and channels the manifest states (scenes at 64
and, in scenes32.npz, 32), no image is one flat colour, every image has at least `min_captions`
captions of `min_words`..`max_words` words, every caption word is in the vocabulary of its source
(the scenes' visual words, Fashion-MNIST's templates and class names), labels and per-slot
attributes are in their vocabularies, ids are unique, and no held-out combination is in train or
val. Writes data/img_validate/result.json and Data Docs; a failed suite exits non-zero naming each
failed expectation. cap_train and img_eval_net refuse to start unless result.json passed on this
very manifest (its sha256).

    python -m tasks.img_validate [key=value ...]
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from forgeline import scenes
from forgeline.config import ConfigError, config_dict, load_config, stage_config
from forgeline.expectations import run_suite
from forgeline.images import FASHION_LABELS, load_images
from forgeline.workspace import run_stage

FASHION_WORDS = frozenset("a photo of on black background grey picture and white image".split()
                          + " ".join(FASHION_LABELS).split())


@dataclass
class ImgValidateConfig:
    manifest: str = "data/img_data/manifest.parquet"
    out_dir: str = "data/img_validate"
    min_images: int = 1000         # fewer is not a training set
    min_captions: int = 5          # CIDEr's consensus needs several references
    min_words: int = 3
    max_words: int = 30            # cap_train's max_len must hold the longest

    def check(self) -> None:
        if self.min_images < 1 or self.min_captions < 1 or not 1 <= self.min_words <= self.max_words:
            raise ConfigError("img_validate: need min_images, min_captions >= 1 and 1 <= min_words <= max_words")


class ValidationFailed(RuntimeError):
    """The manifest did not meet the suite. Not transient: never retried."""


def derive(manifest: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    """The columns the suite checks, from the manifest and the pixels it points at."""
    df = manifest.copy()
    shape = np.zeros((len(df), 3), dtype=np.int64)
    flat = np.zeros(len(df), dtype=bool)
    shape32 = np.full(len(df), 32)
    for file, part in df.groupby("file").groups.items():
        pos = df.index.get_indexer(part)
        images = load_images([file] * len(pos), df.loc[part, "index"].tolist(), data_dir)
        hwc = images.shape[1:] + (1,) * (4 - images.ndim)
        shape[pos] = hwc
        flat[pos] = images.reshape(len(images), -1).std(axis=1) < 1.0
        if file == "scenes64.npz":
            with np.load(data_dir / "scenes32.npz", allow_pickle=False) as z:
                small = z["images"]
            rows = df.loc[part, "index"].to_numpy()
            shape32[pos] = small.shape[1] if rows.max() < len(small) and small.shape[1:] == (32, 32, 3) else -1
    df["actual_height"], df["actual_width"], df["actual_channels"] = shape.T
    df["flat_image"], df["size32"] = flat, shape32
    df["n_captions"] = df["captions"].map(len)
    words = df["captions"].map(lambda cs: [len(c.split()) for c in cs])
    df["min_caption_words"], df["max_caption_words"] = words.map(min), words.map(max)
    vocab = df["source"].map({"scene": scenes.VISUAL_WORDS, "fashion": FASHION_WORDS})
    df["oov_words"] = [sum(w not in v for c in cs for w in c.split()) for cs, v in zip(df["captions"], vocab)]
    df["held_out_in_training"] = df["held_out_combo"] & (df["split"] != "test")
    return df


def build_suite(cfg: ImgValidateConfig):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    slot_sets = [(f"{a}_{s}", ["none", *values]) for s in scenes.SLOTS
                 for a, values in (("shape", scenes.SHAPES), ("colour", scenes.COLOURS), ("size", scenes.SIZES))]
    return gx.ExpectationSuite(name="images", expectations=[
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_images),
        gxe.ExpectColumnValuesToBeUnique(column="image_id"),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=["scene", "fashion"]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val", "test"]),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="height", column_B="actual_height"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="width", column_B="actual_width"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="channels", column_B="actual_channels"),
        gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[28, 64]),
        gxe.ExpectColumnValuesToBeInSet(column="size32", value_set=[32]),
        gxe.ExpectColumnValuesToBeInSet(column="flat_image", value_set=[False]),
        gxe.ExpectColumnValuesToBeBetween(column="n_captions", min_value=cfg.min_captions),
        gxe.ExpectColumnValuesToBeBetween(column="min_caption_words", min_value=cfg.min_words),
        gxe.ExpectColumnValuesToBeBetween(column="max_caption_words", max_value=cfg.max_words),
        gxe.ExpectColumnValuesToBeBetween(column="oov_words", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=["", *FASHION_LABELS]),
        gxe.ExpectColumnValuesToBeBetween(column="n_objects", min_value=1, max_value=3),
        *[gxe.ExpectColumnValuesToBeInSet(column=c, value_set=v) for c, v in slot_sets],
        gxe.ExpectColumnValuesToBeInSet(column="held_out_in_training", value_set=[False]),
    ])


def img_validate(cfg: ImgValidateConfig) -> dict:
    """Run the suite; write result.json and Data Docs; raise ValidationFailed when it fails."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = derive(pd.read_parquet(cfg.manifest), Path(cfg.manifest).parent)
    success, evaluated, failures = run_suite(df.drop(columns=["captions"]), build_suite(cfg), out, "images")
    summary = {
        "success": success, "images": int(len(df)),
        "manifest_sha256": sha256(cfg.manifest),  # which manifest this verdict is about: the trainers check it
        "evaluated_expectations": evaluated, "failed_expectations": len(failures), "failures": failures,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    if failures:
        lines = [f"  - {f['expectation']}({f['column'] or 'table'}): {f['unexpected_count']} unexpected" for f in failures]
        raise ValidationFailed(f"{len(failures)} of {evaluated} expectations failed on {cfg.manifest}:\n"
                               + "\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(ImgValidateConfig, "img_validate", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            summary = img_validate(cfg)
        except ValidationFailed as e:
            mlflow.set_tag("validate.failed", "true")
            mlflow.log_artifact(str(Path(cfg.out_dir) / "result.json"))
            print(f"img_validate: FAILED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({"images": summary["images"], "failed_expectations": 0})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "result.json"))
    print(json.dumps(summary))


def sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@task(name="img_validate", task_run_name="{stage}", retries=0)  # a data failure is not transient: never retried
def img_validate_task(run: dict[str, str], stage: str = "img_validate") -> dict:
    from dvc.exceptions import ReproductionError

    try:
        return run_stage(stage, **run)
    except ReproductionError as e:
        report = Path(load_config(ImgValidateConfig, stage).out_dir) / "result.json"  # fresh: DVC removed the old outs
        if report.exists() and not (summary := json.loads(report.read_text()))["success"]:
            raise ValidationFailed(f"{summary['failed_expectations']} expectations failed: "
                                   + ", ".join(f"{f['expectation']}({f['column']}): {f['unexpected_count']}"
                                               for f in summary["failures"])) from e
        raise


if __name__ == "__main__":
    main()
