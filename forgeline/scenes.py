"""Synthetic scenes whose captions are true by construction: vocabulary, rendering, captions, parsing.

A scene is 1-3 objects in three horizontal slots (left, middle, right), each a shape (circle,
square, triangle) of a colour (red, green, blue, yellow) and a size (small, large), on a plain,
gradient or striped background with mild Gaussian noise. `render` draws it at 2x and averages down
(anti-aliased edges) to 64x64 RGB uint8; `downsample` makes the 32x32 variant. Everything is a pure
function of a numpy Generator, so a seed gives the same images on any machine.

`captions` writes one scene in six phrasings (positions left to right, right to left, by count, by
slot, a plain list, grouped by shape), so CIDEr's consensus over references has several ways of
saying the same thing. `parse_caption` reads the objects a caption names back out ((size, colour,
shape) triples and the count word), which is how captioning is scored against the structured label
(`attribute_scores`), and `VISUAL_WORDS` is every word a caption may use: the serving filter drops
anything else (what a 64x64 render of shapes cannot show).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
SLOTS = ("left", "middle", "right")
COUNT_WORDS = ("one", "two", "three")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
RGB = {"red": (215, 45, 40), "green": (45, 170, 65), "blue": (45, 75, 215), "yellow": (225, 200, 40)}
SLOT_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
CANVAS = 64

# every word any caption uses; a generated caption is filtered to these (serve/caption.py)
VISUAL_WORDS = frozenset(
    " ".join([*SHAPES, *PLURAL.values(), *COLOURS, *SIZES, *SLOTS, *COUNT_WORDS, *SLOT_PHRASE.values()]).split()
    + "a an and of there is are on the in from to left right objects shapes only image picture with one".split())


def sample_object(rng: np.random.Generator, pairs: Sequence[tuple[str, str]]) -> dict:
    """One object: a (shape, colour) pair drawn from `pairs`, a random size."""
    shape, colour = pairs[rng.integers(len(pairs))]
    return {"shape": shape, "colour": colour, "size": SIZES[rng.integers(len(SIZES))]}


def layout(rng: np.random.Generator, objects: list[dict]) -> list[dict]:
    """Place the objects in distinct slots, returned left to right with their slot."""
    slots = sorted(rng.choice(len(SLOTS), size=len(objects), replace=False).tolist())
    return [{**o, "slot": SLOTS[s]} for o, s in zip(objects, slots)]


def random_scene(rng: np.random.Generator, pairs: Sequence[tuple[str, str]], max_objects: int = 3,
                 required: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """1 to `max_objects` objects drawn from `pairs`, one of them (at a random place) from `required` when
    given, laid out in slots left to right."""
    k = int(rng.integers(1, max_objects + 1))
    objs = [sample_object(rng, pairs) for _ in range(k)]
    if required:
        objs[int(rng.integers(k))] = sample_object(rng, required)
    return layout(rng, objs)


def slot_labels(objects: list[dict]) -> dict[str, str]:
    """The per-slot label columns of a scene: shape_left, colour_left, size_left, ... ("none" where empty)."""
    slot = {o["slot"]: o for o in objects}
    return {f"{a}_{s}": slot[s][a] if s in slot else "none" for s in SLOTS for a in ("shape", "colour", "size")}


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, n, 3) float background: plain, vertical gradient or faint stripes, dark or light grey."""
    base = rng.uniform(20, 70) if rng.random() < 0.5 else rng.uniform(170, 230)
    kind = rng.integers(3)
    y = np.linspace(0, 1, n)[:, None]
    if kind == 0:
        grey = np.full((n, n), base)
    elif kind == 1:
        grey = base + rng.uniform(-30, 30) * (y - 0.5) + np.zeros((n, n))
    else:
        grey = base + 8 * np.sign(np.sin(np.arange(n) * np.pi / rng.integers(4, 9)))[None, :] + np.zeros((n, n))
    tint = rng.uniform(-10, 10, size=3)
    return grey[..., None] + tint


def _mask(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # triangle pointing up: inside the three half-planes
    top, base_y, half = cy - r, cy + r * 0.8, r
    left_edge = (xx - (cx - half)) * (top - base_y) - (yy - base_y) * (cx - (cx - half))
    right_edge = (xx - cx) * (base_y - top) - (yy - top) * ((cx + half) - cx)
    return (yy <= base_y) & (left_edge <= 0) & (right_edge <= 0)


def render(rng: np.random.Generator, objects: list[dict], noise: float = 6.0) -> np.ndarray:
    """(64, 64, 3) uint8 image of `objects` (with slots); drawn at 128 and averaged down 2x."""
    n = 2 * CANVAS
    img = _background(rng, n)
    slot_w = n / len(SLOTS)
    for o in objects:
        r = (rng.uniform(7, 9) if o["size"] == "small" else rng.uniform(15, 18)) * n / 128
        cx = (SLOTS.index(o["slot"]) + 0.5) * slot_w + rng.uniform(-3, 3)
        cy = n / 2 + rng.uniform(-(n / 2 - r - 6), n / 2 - r - 6)
        colour = np.array(RGB[o["colour"]], dtype=float) + rng.uniform(-20, 20, size=3)
        img[_mask(o["shape"], cx, cy, r, n)] = colour
    img = img.reshape(CANVAS, 2, CANVAS, 2, 3).mean(axis=(1, 3))
    img += rng.normal(0, noise, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def downsample(images: np.ndarray, factor: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H/f, W/f, C) by averaging f x f blocks."""
    n, h, w, c = images.shape
    out = images.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float32).mean(axis=(2, 4))
    return np.rint(out).astype(np.uint8)


# ----------------------------------------------------------------------------- captions


def _desc(o: dict, size: bool = True) -> str:
    return f"a {o['size']} {o['colour']} {o['shape']}" if size else f"a {o['colour']} {o['shape']}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else " ".join(parts[:-1]) + " and " + parts[-1]


def captions(objects: list[dict]) -> list[str]:
    """Six reference captions of one scene (objects left to right, each with a slot), lowercase words only."""
    k, d = len(objects), [_desc(o) for o in objects]
    count = COUNT_WORDS[k - 1]
    if k == 1:
        o = objects[0]
        return [f"{d[0]} {SLOT_PHRASE[o['slot']]}", f"there is only {d[0]}", f"one {_desc(o, False)[2:]} {SLOT_PHRASE[o['slot']]}",
                f"there is {d[0]} {SLOT_PHRASE[o['slot']]}", f"an image with {d[0]}",
                f"a picture of one {o['size']} {o['colour']} {o['shape']}"]
    shapes = {o["shape"] for o in objects}
    grouped = (f"{count} {PLURAL[objects[0]['shape']]} " + _join([f"a {o['size']} {o['colour']} one" for o in objects])
               if len(shapes) == 1 else f"{count} shapes from left to right " + _join(d))
    return [
        " left of ".join(d),
        " right of ".join(reversed(d)),
        f"{count} objects " + _join([_desc(o, False) for o in objects]),
        "there is " + _join([f"{x} {SLOT_PHRASE[o['slot']]}" for x, o in zip(d, objects)]),
        "an image with " + _join(d),
        grouped,
    ]


# ----------------------------------------------------------------------------- reading captions back

_OBJ = re.compile(r"\b(?:(small|large) )?(red|green|blue|yellow) (circle|square|triangle|one)\b")
_GROUP = re.compile(r"^(one|two|three) (circles|squares|triangles)\b")
_COUNT = re.compile(r"^(?:a picture of |there is only )?(one|two|three)\b")


def parse_caption(text: str) -> dict:
    """The objects a caption names, as (size or None, colour, shape) triples in order, and its count
    word (None when it says no number). "two squares a red one and ..." resolves "one" to the group's shape."""
    text = " ".join(text.lower().split())
    group = _GROUP.match(text)
    shape_of_one = {v: k for k, v in PLURAL.items()}[group.group(2)] if group else None
    objs = []
    for size, colour, shape in _OBJ.findall(text):
        if shape == "one":
            if shape_of_one is None:
                continue
            shape = shape_of_one
        objs.append((size or None, colour, shape))
    count = _COUNT.match(text)
    return {"objects": objs, "count": COUNT_WORDS.index(count.group(1)) + 1 if count else None}


def attribute_scores(caption: str, objects: list[dict]) -> dict[str, float]:
    """How well one caption names a scene's objects, each 0 or 1: `objects` the multiset of (colour,
    shape) pairs exactly; `shapes`, `colours`, `sizes` each multiset alone (a size the caption leaves
    out counts as wrong); `count` the number of objects named (and the count word, when given)."""
    got = parse_caption(caption)
    named = got["objects"]
    want = [(o["size"], o["colour"], o["shape"]) for o in objects]

    def same(i: int) -> float:
        return float(Counter(t[i] for t in named) == Counter(t[i] for t in want))

    n = got["count"] if got["count"] is not None else len(named)
    return {"objects": float(Counter(t[1:] for t in named) == Counter(t[1:] for t in want)), "sizes": same(0),
            "colours": same(1),
            "shapes": same(2), "count": float(n == len(want) and len(named) == len(want))}


def filter_words(text: str) -> tuple[str, list[str]]:
    """Keep the words a scene image can show (VISUAL_WORDS); return the caption and what was dropped."""
    words = text.split()
    return " ".join(w for w in words if w in VISUAL_WORDS), [w for w in words if w not in VISUAL_WORDS]
