"""gan_data: procedurally rendered faces with labelled attributes, at 64x64 and 32x32, versioned by DVC.

Each face is a pure function of a numpy Generator (seeded): a face shape (round, oval, square) in a
skin tone (light, tan, brown, dark), eyes (open, closed), brows (thin, thick) and hair (bald,
short, long) in a hair colour (black, brown, blond, red; the brows take it too), a mouth (smile,
neutral, open) and glasses (no, yes), on a random pale background with a little jitter in place,
size and colour and mild Gaussian noise. Drawn at 128x128 and averaged down (anti-aliased edges)
to 64x64, then 32x32. Attributes are drawn independently and uniformly; splits are random.

Writes data/gan_data/: faces64.npz and faces32.npz (uint8 `images` (N, S, S, 3), no pickle),
manifest.parquet (image_id, split, index, one column per attribute), attributes.json (attribute
-> class names, in label order), summary.json and examples.png.

    python -m tasks.gan_data [key=value ...]
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.workspace import run_stage

ATTRIBUTES = {
    "face": ["round", "oval", "square"],
    "skin": ["light", "tan", "brown", "dark"],
    "eyes": ["open", "closed"],
    "brows": ["thin", "thick"],
    "hair": ["bald", "short", "long"],
    "hair_colour": ["black", "brown", "blond", "red"],
    "mouth": ["smile", "neutral", "open"],
    "glasses": ["no", "yes"],
}
SKIN = {"light": (240, 208, 182), "tan": (214, 168, 122), "brown": (158, 106, 70), "dark": (96, 62, 42)}
HAIR = {"black": (28, 24, 24), "brown": (105, 66, 34), "blond": (228, 196, 110), "red": (186, 66, 30)}
CANVAS = 128  # drawing resolution; averaged down 2x and 4x


@dataclass
class GanDataConfig:
    out_dir: str = "data/gan_data"
    seed: int = 0
    train: int = 8000
    val: int = 500
    test: int = 1500
    noise: float = 4.0          # std of the Gaussian pixel noise, 0-255 scale

    def check(self) -> None:
        if min(self.train, self.val, self.test) < 1 or self.noise < 0:
            raise ConfigError("gan_data: train, val, test >= 1 and noise >= 0")


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    return {a: names[int(rng.integers(len(names)))] for a, names in ATTRIBUTES.items()}


def render_face(rng: np.random.Generator, attrs: dict[str, str], noise: float = 4.0) -> np.ndarray:
    """One face (64, 64, 3) uint8; 128x128 drawing averaged 2x2."""
    n = CANVAS
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    img = np.empty((n, n, 3))
    img[:] = rng.uniform(150, 250, size=3)                                   # pale background
    cx, cy = n / 2 + rng.uniform(-5, 5), n / 2 + 6 + rng.uniform(-4, 4)
    s = rng.uniform(0.92, 1.06)
    rx, ry = {"round": (36, 38), "oval": (29, 44), "square": (34, 39)}[attrs["face"]]
    rx, ry = rx * s, ry * s
    p = 4.0 if attrs["face"] == "square" else 2.0                            # superellipse exponent
    face = (np.abs(xx - cx) / rx) ** p + (np.abs(yy - cy) / ry) ** p <= 1
    hair_rgb = np.array(HAIR[attrs["hair_colour"]]) + rng.uniform(-8, 8, 3)
    skin_rgb = np.array(SKIN[attrs["skin"]]) + rng.uniform(-8, 8, 3)
    if attrs["hair"] == "long":                                              # behind the face, down to the chin
        back = (np.abs(xx - cx) <= rx + 9) & (yy >= cy - ry - 8) & (yy <= cy + ry * 0.75)
        img[back] = hair_rgb
    img[face] = skin_rgb
    if attrs["hair"] != "bald":                                              # a cap over the top of the head
        cap = ((xx - cx) / (rx + 6)) ** 2 + ((yy - cy + 4) / (ry + 8)) ** 2 <= 1
        img[cap & (yy < cy - ry * 0.55)] = hair_rgb
    ey, ex = cy - ry * 0.05, rx * 0.4
    dark = np.array((25, 20, 20))
    for side in (-1, 1):
        x0 = cx + side * ex
        if attrs["eyes"] == "open":
            img[((xx - x0) / 7) ** 2 + ((yy - ey) / 4.5) ** 2 <= 1] = (245, 245, 245)
            img[(xx - x0) ** 2 + (yy - ey) ** 2 <= 3.2 ** 2] = dark
        else:
            img[(np.abs(xx - x0) <= 7) & (np.abs(yy - ey) <= 1.5)] = dark
        half = 1.2 if attrs["brows"] == "thin" else 3.2   # between the hair line and the glasses' rims
        img[(np.abs(xx - x0) <= 9) & (np.abs(yy - (ey - 13.5)) <= half)] = hair_rgb * 0.8
        if attrs["glasses"] == "yes":
            r = np.hypot(xx - x0, yy - ey)
            img[(r >= 8.5) & (r <= 11)] = (20, 20, 30)
    if attrs["glasses"] == "yes":
        img[(np.abs(xx - cx) <= ex - 8.5) & (np.abs(yy - ey) <= 1.5)] = (20, 20, 30)
    my, mw = cy + ry * 0.5, rx * 0.42
    lips = np.array((150, 40, 45))
    if attrs["mouth"] == "smile":                                            # the lower half of a ring
        r = np.hypot((xx - cx) / mw, (yy - my + 6) / 10)
        img[(r >= 0.75) & (r <= 1.0) & (yy > my - 4)] = lips
    elif attrs["mouth"] == "neutral":
        img[(np.abs(xx - cx) <= mw) & (np.abs(yy - my) <= 2)] = lips
    else:
        img[((xx - cx) / (mw * 0.6)) ** 2 + ((yy - my) / 6) ** 2 <= 1] = (60, 15, 20)
    img = img.reshape(n // 2, 2, n // 2, 2, 3).mean(axis=(1, 3))
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def downsample(images: np.ndarray, k: int) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, S/k, S/k, 3) by k x k means."""
    n, s, _, c = images.shape
    return np.rint(images.reshape(n, s // k, k, s // k, k, c).mean(axis=(2, 4))).astype(np.uint8)


def make_faces(cfg: GanDataConfig) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(cfg.seed)
    images, rows = [], []
    for split, count in (("train", cfg.train), ("val", cfg.val), ("test", cfg.test)):
        for _ in range(count):
            attrs = sample_attributes(rng)
            images.append(render_face(rng, attrs, cfg.noise))
            rows.append({"image_id": f"face-{len(rows):06d}", "split": split, "index": len(rows), **attrs})
    return np.stack(images), pd.DataFrame(rows)


def gan_data(cfg: GanDataConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, manifest = make_faces(cfg)
    np.savez_compressed(out / "faces64.npz", images=images)
    np.savez_compressed(out / "faces32.npz", images=downsample(images, 2))
    manifest.to_parquet(out / "manifest.parquet", index=False)
    (out / "attributes.json").write_text(json.dumps(ATTRIBUTES, indent=2) + "\n")
    from PIL import Image

    Image.fromarray(np.concatenate(list(images[:8]), axis=1)).resize((128 * 8, 128), Image.NEAREST).save(out / "examples.png")
    summary = {"images": len(manifest), "splits": manifest["split"].value_counts().to_dict(), "sizes": [64, 32],
               "attributes": {a: manifest[a].value_counts().to_dict() for a in ATTRIBUTES}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(GanDataConfig, "gan_data", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        summary = gan_data(cfg)
        mlflow.log_metrics({f"images.{k}": v for k, v in summary["splits"].items()})
        for name in ("summary.json", "examples.png"):
            mlflow.log_artifact(str(Path(cfg.out_dir) / name))
    print(json.dumps(summary["splits"]))


@task(name="gan_data", task_run_name="{stage}")
def gan_data_task(run: dict[str, str], stage: str = "gan_data") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
