"""Image arrays for the image pipelines: the img_data manifest's pixels, Fashion-MNIST in place, preprocessing.

Pixels live in uint8 arrays: the scenes in img_data's `scenes64.npz` / `scenes32.npz` (key
`images`, (N, H, W, 3), loaded with allow_pickle=False), Fashion-MNIST in the IDX files of Debian's
`dataset-fashion-mnist` package, read where the package put them (never copied). A manifest row
names its pixels by `file` and `index`; `load_images` gathers them.

`to_tensor` is the one preprocessing every model sees (training, evaluation and the service):
resize to the model's square size (bilinear), grey to RGB, [0, 255] -> [-1, 1]. `decode_upload`
turns uploaded bytes into an RGB array, or raises BadImage naming why.

    from forgeline.images import load_images, to_tensor
"""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist (scripts/install.sh)
FASHION_LABELS = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot")
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzipped) as a uint8 array: magic 0x0000 08 <ndim>, big-endian dims."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_fashion(part: str, root: str | Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the package's `train` or `t10k` part."""
    images, labels = (read_idx(Path(root) / name) for name in FASHION_FILES[part])
    if len(images) != len(labels):
        raise ValueError(f"{root}: {part} has {len(images)} images and {len(labels)} labels")
    return images, labels


def load_images(files: list[str], indices: list[int], data_dir: str | Path) -> np.ndarray:
    """The pixels of manifest rows (same `file` for all, or mixed): (N, H, W[, C]) uint8, in row order.
    `file` is an npz under data_dir, or `fashion:<part>` for the package's IDX files."""
    cache: dict[str, np.ndarray] = {}
    out = []
    for file, index in zip(files, indices):
        if file not in cache:
            if file.startswith("fashion:"):
                cache[file] = read_fashion(file.split(":", 1)[1])[0]
            else:
                with np.load(Path(data_dir) / file, allow_pickle=False) as z:
                    cache[file] = z["images"]
        out.append(cache[file][index])
    return np.stack(out)


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, 3, size, size) in [-1, 1]: grey repeated to RGB,
    resized (bilinear, antialiased) when H or W differs from size."""
    x = torch.from_numpy(images.astype(np.float32))  # a copy: uploads arrive read-only
    if x.ndim == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2)
    if x.size(1) == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1.0


class BadImage(ValueError):
    """Uploaded bytes that are not an image the service takes (the message says why)."""


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> (H, W, 3) uint8 RGB. Rejects empty or oversized bodies, what Pillow cannot
    read, and images over max_pixels (checked from the header, before decoding: no decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage("empty body: send the image's bytes")
    if len(data) > max_bytes:
        raise BadImage(f"{len(data)} bytes: the limit is {max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(f"{w}x{h} pixels: the limit is {max_pixels}")
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadImage(f"not a readable image: {type(e).__name__}") from None
