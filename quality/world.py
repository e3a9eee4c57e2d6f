"""A small procedurally generated world with known ground truth, and detectors that read it back.

Every image is one object (shape, colour, style, position, size) on a flat background, rendered
without anti-aliasing so the exact palette colours appear; captions describe the scene in a fixed
vocabulary ("a red circle, small, top left, on a sky background, flat style"). Everything is a
pure function of a seed.

Detectors are analytic (no learned model): background = nearest palette colour of the border;
object = largest connected component of pixels far from the background (holes filled); position
and size from its bounding box; shape by IoU of the box-normalised mask with each shape's
template; colour by the nearest palette colour of its non-dark, non-background pixels; style from
the fractions of dark (stripes) and background-coloured (outline interior) pixels inside it.
On rendered images they recover the ground truth exactly (tested); on sampled images they are
what the benchmark's metrics read.
"""

from __future__ import annotations

import hashlib
import random as _random
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import numpy as np
from scipy import ndimage

# ----------------------------------------------------------------------------- vocabulary
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235), "grey": (128, 128, 128), "sand": (222, 196, 150),
    "sky": (150, 190, 235), "mint": (160, 220, 180), "pink": (240, 180, 200)}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (50, 90, 230), "yellow": (240, 210, 30),
    "orange": (245, 130, 20), "purple": (150, 40, 190),
    # never used in pretraining (novel concepts)
    "teal": (0, 140, 140), "magenta": (230, 0, 200)}
STRIPE_RGB = (20, 20, 20)
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PRETRAIN_SHAPES = ("circle", "square", "triangle")
PRETRAIN_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
STYLES = ("flat", "outlined", "striped")
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) of the box centre, fractions of the side
    "centre": (0.5, 0.5), "top left": (0.3, 0.3), "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}
SIZES: dict[str, float] = {"small": 0.28, "large": 0.52}  # box side, fraction of the image side
SIZE_JITTER = 0.03
POSITION_JITTER = 0.05
MARGIN = 0.04  # the object never comes closer to the border than this (fraction)
GENERIC_SHAPE = "shape"  # class word: "a red shape", "a sks shape"
CONCEPT_TOKEN = "sks"
WORDS = tuple(dict.fromkeys(
    ["a", "on", "background", "style", "shape", "in", "the", CONCEPT_TOKEN, "top", "bottom", "left",
     "right", "centre", *BACKGROUNDS, *COLOURS, *SHAPES, *STYLES, *SIZES]))


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. cx, cy, size are fractions of the image side."""

    shape: str
    colour: str
    style: str
    background: str
    position: str
    size_name: str
    cx: float
    cy: float
    size: float

    def to_dict(self) -> dict:
        return asdict(self)


def place(position: str, size_name: str, rng: _random.Random | None = None) -> tuple[float, float, float]:
    """(cx, cy, size) for a named position/size, with jitter from rng (none without one)."""
    jit = (lambda a: rng.uniform(-a, a)) if rng is not None else (lambda a: 0.0)
    size = SIZES[size_name] + jit(SIZE_JITTER)
    lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
    ax, ay = POSITIONS[position]
    cx = min(max(ax + jit(POSITION_JITTER), lo), hi)
    cy = min(max(ay + jit(POSITION_JITTER), lo), hi)
    return cx, cy, size


def random_scene(rng: _random.Random, shapes: Iterable[str] = PRETRAIN_SHAPES,
                 colours: Iterable[str] = PRETRAIN_COLOURS, **fixed) -> Scene:
    """A random scene; keyword arguments fix attributes (shape=, background=, position=, ...)."""
    pick = lambda name, options: fixed[name] if name in fixed else rng.choice(tuple(options))  # noqa: E731
    shape, colour = pick("shape", shapes), pick("colour", colours)
    style, bg = pick("style", STYLES), pick("background", BACKGROUNDS)
    position, size_name = pick("position", POSITIONS), pick("size_name", SIZES)
    cx, cy, size = place(position, size_name, rng if fixed.get("jitter", True) else None)
    return Scene(shape, colour, style, bg, position, size_name, cx, cy, size)


def combo_key(scene: Scene) -> tuple:
    return (scene.shape, scene.colour, scene.style, scene.background, scene.position, scene.size_name)


def is_held_out(scene: Scene, fraction: int = 10) -> bool:
    """1 in `fraction` attribute combinations never appears in pretraining (stable hash)."""
    h = hashlib.sha256("|".join(combo_key(scene)).encode()).digest()
    return h[0] % fraction == 0


# ----------------------------------------------------------------------------- rendering

def _box(scene: Scene, n: int) -> tuple[int, int, int]:
    """(left, top, side) in pixels of the object's box."""
    side = max(4, int(round(scene.size * n)))
    left = int(round(scene.cx * n - side / 2))
    top = int(round(scene.cy * n - side / 2))
    return left, top, side


def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of `shape` filling its box; sampled at pixel centres."""
    c = (np.arange(side) + 0.5) / side * 2 - 1  # -1..1
    x, y = np.meshgrid(c, c)  # y grows downwards
    if shape == "circle":
        m = x * x + y * y <= 1.0
    elif shape == "square":
        m = np.ones((side, side), bool)
    elif shape == "triangle":  # apex at the top
        m = np.abs(x) <= (y + 1) / 2
    elif shape == "cross":
        m = (np.abs(x) <= 1 / 3) | (np.abs(y) <= 1 / 3)
    elif shape == "diamond":
        m = np.abs(x) + np.abs(y) <= 1.0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    return ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=k, border_value=0)


def outline_width(side: int) -> int:
    return max(2, int(round(0.08 * side)))


def stripe_period(side: int) -> float:
    return side / 3.0  # three dark bands


def render(scene: Scene, n: int = 128) -> np.ndarray:
    """(n, n, 3) uint8 image of the scene."""
    img = np.empty((n, n, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    left, top, side = _box(scene, n)
    m = shape_mask(scene.shape, side)
    colour = np.zeros((side, side, 3), np.uint8)
    colour[:] = COLOURS[scene.colour]
    if scene.style == "outlined":
        m = m & ~_erode(m, outline_width(side))
    elif scene.style == "striped":
        period = stripe_period(side)
        rows = (np.floor((np.arange(side) + 0.5) / (period / 2)).astype(int) % 2) == 1
        colour[rows] = STRIPE_RGB
    ys, xs = np.nonzero(m)
    yy, xx = ys + top, xs + left
    ok = (yy >= 0) & (yy < n) & (xx >= 0) & (xx < n)
    img[yy[ok], xx[ok]] = colour[ys[ok], xs[ok]]
    return img


# ----------------------------------------------------------------------------- captions

def caption_from(attrs: dict, *, token: str | None = None, shape_word: str | None = None) -> str:
    """Caption from a partial attribute dict (keys of Scene; missing ones are not mentioned).

    "a red circle, small, top left, on a sky background, flat style"; without a shape the class
    word "shape" is used; token goes before the shape word ("a sks shape").
    """
    noun = shape_word or attrs.get("shape") or GENERIC_SHAPE
    head = ["a"] + ([attrs["colour"]] if attrs.get("colour") else []) + ([token] if token else []) + [noun]
    parts = [" ".join(head)]
    if attrs.get("size_name"):
        parts.append(attrs["size_name"])
    if attrs.get("position"):
        parts.append("in the centre" if attrs["position"] == "centre" else attrs["position"])
    if attrs.get("background"):
        parts.append(f"on a {attrs['background']} background")
    if attrs.get("style"):
        parts.append(f"{attrs['style']} style")
    return ", ".join(parts)


ATTRIBUTE_KEYS = {"colour": "colour", "shape": "shape", "size": "size_name", "position": "position",
                  "background": "background", "style": "style"}


def caption(scene: Scene, *, shape_word: str | None = None, drop: Iterable[str] = (),
            token: str | None = None) -> str:
    """Caption of a scene; drop: attributes left out ("colour", "shape", "size", "position",
    "background", "style"); a dropped shape becomes the class word "shape"."""
    drop = set(drop)
    attrs = {key: getattr(scene, field) for name, field in ATTRIBUTE_KEYS.items() for key in [field]
             if name not in drop}
    return caption_from(attrs, token=token, shape_word=shape_word)


ATTRIBUTES = ("colour", "shape", "size", "position", "background", "style")


def training_caption(scene: Scene, rng: _random.Random, p_drop: float = 0.25) -> str:
    """Caption with each attribute left out with probability p_drop (the prior learns partial prompts)."""
    return caption(scene, drop=[a for a in ATTRIBUTES if rng.random() < p_drop])


# ----------------------------------------------------------------------------- detection

@dataclass
class Detection:
    """What the detectors read from an image. Fractions of the image side for cx, cy, size."""

    background: str
    present: bool
    shape: str | None = None
    colour: str | None = None
    style: str | None = None
    position: str | None = None
    size_name: str | None = None
    cx: float = float("nan")
    cy: float = float("nan")
    size: float = float("nan")
    shape_iou: float = 0.0  # IoU with the detected shape's template
    area: float = 0.0  # object pixels / image pixels

    def to_dict(self) -> dict:
        return asdict(self)


FG_THRESHOLD = 60.0  # RGB distance from the background beyond which a pixel is "object"
DARK_LUMA = 55.0
MIN_AREA = 0.004  # smaller objects count as absent (fraction of the image)
TEMPLATE_SIDE = 24


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]],
             names: Iterable[str] | None = None) -> str:
    names = list(names or palette)
    d = [float(np.sum((rgb - np.asarray(palette[k], float)) ** 2)) for k in names]
    return names[int(np.argmin(d))]


_TEMPLATES: dict[str, np.ndarray] = {}


def _template(shape: str) -> np.ndarray:
    if shape not in _TEMPLATES:
        _TEMPLATES[shape] = shape_mask(shape, TEMPLATE_SIDE)
    return _TEMPLATES[shape]


def _normalised(mask: np.ndarray) -> np.ndarray:
    """Crop a bool mask to its bounding box and resample it to TEMPLATE_SIDE^2 (nearest centre)."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    iy = np.minimum(((np.arange(TEMPLATE_SIDE) + 0.5) * h / TEMPLATE_SIDE).astype(int), h - 1)
    ix = np.minimum(((np.arange(TEMPLATE_SIDE) + 0.5) * w / TEMPLATE_SIDE).astype(int), w - 1)
    return crop[np.ix_(iy, ix)]


def classify_shape(mask: np.ndarray, shapes: Iterable[str] = SHAPES,
                   rotation_deg: float = 0.0) -> tuple[str, float]:
    """Best template by IoU of the box-normalised mask; returns (shape, iou).

    rotation_deg > 0 also tries the mask turned back by every angle in [-rotation_deg,
    rotation_deg] in steps of at most 5 degrees (ATA's augmentation rotates the concept by up to
    15 degrees; a turned cross is still the cross, while box-normalised it looks like a diamond).
    """
    masks = [mask]
    if rotation_deg > 0:
        k = int(np.ceil(rotation_deg / 5.0))
        for angle in np.linspace(-rotation_deg, rotation_deg, 2 * k + 1):
            if angle != 0:
                turned = ndimage.rotate(mask.astype(np.float32), float(angle), reshape=True, order=1) > 0.5
                if turned.any():
                    masks.append(turned)
    best, best_iou = None, -1.0
    for m in masks:
        norm = _normalised(m)
        for s in shapes:
            t = _template(s)
            iou = float((norm & t).sum()) / max(1.0, float((norm | t).sum()))
            if iou > best_iou:
                best, best_iou = s, iou
    return best, best_iou  # type: ignore[return-value]


def border_rgb(img: np.ndarray, width: int = 2) -> np.ndarray:
    """Median RGB of the `width`-pixel frame of an (H, W, 3) image -> (3,) float64."""
    frame = np.concatenate([img[:width].reshape(-1, 3), img[-width:].reshape(-1, 3),
                            img[:, :width].reshape(-1, 3), img[:, -width:].reshape(-1, 3)])
    return np.median(frame.astype(np.float64), axis=0)


def detect(img: np.ndarray, rotation_deg: float = 0.0) -> Detection:
    """Read the scene back from an (n, n, 3) uint8 image (rotation_deg: see classify_shape)."""
    n = img.shape[0]
    px = img.astype(np.float64)
    bg_rgb = border_rgb(px)
    background = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.sqrt(((px - bg_rgb) ** 2).sum(-1))
    fg = dist > FG_THRESHOLD
    labels, count = ndimage.label(fg, structure=np.ones((3, 3), bool))
    if count == 0:
        return Detection(background, False)
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, count + 1))
    obj = labels == (int(np.argmax(sizes)) + 1)
    filled = ndimage.binary_fill_holes(obj)
    area = float(filled.sum()) / (n * n)
    if area < MIN_AREA:
        return Detection(background, False, area=area)
    ys, xs = np.nonzero(filled)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cx, cy = (left + right) / 2 / n, (top + bottom) / 2 / n
    size = max(bottom - top, right - left) / n
    shape, iou = classify_shape(filled, rotation_deg=rotation_deg)
    inside = px[filled]
    luma = inside @ np.array([0.299, 0.587, 0.114])
    d_in = dist[filled]
    dark = (luma < DARK_LUMA) & (d_in > FG_THRESHOLD)
    bg_like = d_in <= FG_THRESHOLD
    colour_px = inside[~dark & ~bg_like]
    colour = _nearest(colour_px.mean(0), COLOURS) if len(colour_px) else _nearest(inside.mean(0), COLOURS)
    dark_frac, bg_frac = float(dark.mean()), float(bg_like.mean())
    style = "striped" if dark_frac > 0.2 else ("outlined" if bg_frac > 0.15 else "flat")
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    size_name = min(SIZES, key=lambda s: abs(SIZES[s] - size))
    return Detection(background, True, shape, colour, style, position, size_name, cx, cy, size, iou, area)


def detect_many(images: Iterable[np.ndarray]) -> list[Detection]:
    return [detect(im) for im in images]


def scene_with(scene: Scene, **changes) -> Scene:
    return replace(scene, **changes)
