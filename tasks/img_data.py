"""img_data: captioned images whose content is known, versioned by DVC: synthetic scenes and Fashion-MNIST.

Scenes (forgeline/scenes.py): seeded renders of 1-3 objects (shape, colour, size, slot) at 64x64
RGB with a 32x32 variant, each with its structured label and six reference captions. The split is
by attribute combination: the (shape, colour) pairs in `held_out_pairs` never occur in train or
val; every test scene holds at least one of them next to ordinary objects, so the test split asks
for combinations no model has seen.

Fashion-MNIST: read in place from Debian's `dataset-fashion-mnist` package (IDX files under
`fashion_dir`, never copied); its captions are made from the class name. train = the package's
train part less its last `fashion_val` images (val), test = its t10k part.

Writes data/img_data/: manifest.parquet (one row per image: image_id, source, split, file, index,
height, width, channels, label, label_id, n_objects, objects (JSON), per-slot shape/colour/size,
held_out_combo, captions), scenes64.npz and scenes32.npz (uint8 `images`, no pickle),
summary.json (counts, the package's version and files' sha256) and examples.png.

    python -m tasks.img_data [key=value ...]
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from forgeline import scenes
from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.images import FASHION_FILES, FASHION_LABELS, read_fashion
from forgeline.workspace import run_stage

FASHION_TEMPLATES = ("a photo of a {}", "a {} on a black background", "a grey {}", "a picture of a {}",
                     "a black and white image of a {}")


@dataclass
class ImgDataConfig:
    out_dir: str = "data/img_data"
    seed: int = 0
    train_scenes: int = 6000
    val_scenes: int = 500
    test_scenes: int = 1000
    max_objects: int = 3
    noise: float = 6.0                       # std of the Gaussian pixel noise, 0-255 scale
    held_out_pairs: list[str] = field(default_factory=lambda: ["triangle:red", "circle:green", "square:yellow"])
    fashion_dir: str = "/usr/share/datasets/fashion-mnist"
    fashion_train: int = 55000               # at most 60000 - fashion_val
    fashion_val: int = 5000
    fashion_test: int = 10000                # at most 10000

    def check(self) -> None:
        if min(self.train_scenes, self.val_scenes, self.test_scenes) < 1 or not 1 <= self.max_objects <= 3:
            raise ConfigError("img_data: scene counts >= 1 and 1 <= max_objects <= 3")
        pairs = self.pairs()
        if not pairs or len(pairs) >= len(scenes.SHAPES) * len(scenes.COLOURS):
            raise ConfigError("img_data: held_out_pairs must leave some pairs for training")
        shapes, colours = {s for s, _ in self.allowed()}, {c for _, c in self.allowed()}
        if shapes != set(scenes.SHAPES) or colours != set(scenes.COLOURS):
            raise ConfigError("img_data: every shape and every colour must still occur in training")
        if self.fashion_train + self.fashion_val > 60000 or not 0 <= self.fashion_test <= 10000:
            raise ConfigError("img_data: Fashion-MNIST has 60000 train and 10000 t10k images")

    def pairs(self) -> list[tuple[str, str]]:
        out = []
        for p in self.held_out_pairs:
            shape, _, colour = p.partition(":")
            if shape not in scenes.SHAPES or colour not in scenes.COLOURS:
                raise ConfigError(f"img_data: held-out pair {p!r} is not shape:colour")
            out.append((shape, colour))
        return out

    def allowed(self) -> list[tuple[str, str]]:
        held = set(self.pairs())
        return [(s, c) for s in scenes.SHAPES for c in scenes.COLOURS if (s, c) not in held]


def make_scenes(cfg: ImgDataConfig) -> tuple[np.ndarray, list[dict]]:
    """All scenes, train then val then test: images (N, 64, 64, 3) uint8 and one row each."""
    rng = np.random.default_rng(cfg.seed)
    allowed, held = cfg.allowed(), cfg.pairs()
    images, rows = [], []
    for split, n in (("train", cfg.train_scenes), ("val", cfg.val_scenes), ("test", cfg.test_scenes)):
        for _ in range(n):
            # a test scene holds at least one unseen combination, at a random place among the others
            objs = scenes.random_scene(rng, allowed, cfg.max_objects, held if split == "test" else ())
            images.append(scenes.render(rng, objs, cfg.noise))
            rows.append({"image_id": f"scene-{len(rows):06d}", "source": "scene", "split": split,
                         "file": "scenes64.npz", "index": len(rows), "height": 64, "width": 64, "channels": 3,
                         "label": "", "label_id": -1, "n_objects": len(objs), "objects": json.dumps(objs),
                         **scenes.slot_labels(objs),
                         "held_out_combo": any((o["shape"], o["colour"]) in held for o in objs),
                         "captions": scenes.captions(objs)})
    return np.stack(images), rows


def fashion_rows(cfg: ImgDataConfig) -> list[dict]:
    _, train_labels = read_fashion("train", cfg.fashion_dir)
    _, test_labels = read_fashion("t10k", cfg.fashion_dir)
    n_train = len(train_labels)
    parts = [("train", "train", range(cfg.fashion_train)),
             ("val", "train", range(n_train - cfg.fashion_val, n_train)),
             ("test", "t10k", range(cfg.fashion_test))]
    rows = []
    for split, part, indices in parts:
        labels = train_labels if part == "train" else test_labels
        for i in indices:
            name = FASHION_LABELS[labels[i]]
            rows.append({"image_id": f"fashion-{part}-{i:05d}", "source": "fashion", "split": split,
                         "file": f"fashion:{part}", "index": i, "height": 28, "width": 28, "channels": 1,
                         "label": name, "label_id": int(labels[i]), "n_objects": 1, "objects": "[]",
                         **{f"{a}_{s}": "none" for s in scenes.SLOTS for a in ("shape", "colour", "size")},
                         "held_out_combo": False, "captions": [t.format(name) for t in FASHION_TEMPLATES]})
    return rows


def package_version(name: str = "dataset-fashion-mnist") -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (not installed by dpkg)"


def img_data(cfg: ImgDataConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, rows = make_scenes(cfg)
    np.savez_compressed(out / "scenes64.npz", images=images)
    np.savez_compressed(out / "scenes32.npz", images=scenes.downsample(images, 2))
    rows += fashion_rows(cfg)
    manifest = pd.DataFrame(rows)
    manifest.to_parquet(out / "manifest.parquet", index=False)
    write_examples(images[:8], out / "examples.png")
    counts = manifest.groupby(["source", "split"]).size()
    summary = {
        "images": int(len(manifest)), "counts": {f"{s}/{p}": int(n) for (s, p), n in counts.items()},
        "held_out_pairs": cfg.held_out_pairs,
        "test_scenes_with_held_out_pair": int(manifest.query("source == 'scene' and split == 'test'")["held_out_combo"].sum()),
        "train_scenes_with_held_out_pair": int(manifest.query("source == 'scene' and split != 'test'")["held_out_combo"].sum()),
        "fashion": {"package": "dataset-fashion-mnist", "version": package_version(), "dir": cfg.fashion_dir,
                    "sha256": {n: sha256(Path(cfg.fashion_dir) / n) for pair in FASHION_FILES.values() for n in pair}},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_examples(images: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.concatenate(list(images), axis=1)).resize((128 * len(images), 128), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(ImgDataConfig, "img_data", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = img_data(cfg)
        mlflow.log_metrics({f"images.{k.replace('/', '.')}": v for k, v in summary["counts"].items()})
        for name in ("summary.json", "examples.png"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print(json.dumps(summary["counts"]))


def sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@task(name="img_data", task_run_name="{stage}")
def img_data_task(run: dict[str, str], stage: str = "img_data") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
