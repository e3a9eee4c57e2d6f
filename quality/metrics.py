"""Benchmark metrics, computed exactly from detections and images (no learned judge).

All functions take plain lists / arrays so they can be checked against hand-computed values.

identity        fraction of concept-prompt images whose object is present with the concept's shape
                and colour (the references' identity).
identity_loose  same, but any shape the prior never saw (cross or diamond) counts: through the
                8x8 latent a *small* cross decodes to a diamond-like blob even for a perfect
                generator (the VAE ceiling, see quality/README.md), and the prior itself never
                draws either shape.
context         fraction of requested context attributes (background, style) that were generated,
                averaged over images and attributes.
layout          same for the requested layout attributes (position, size).
pos_spread      RMS distance of the generated objects' centres from the references' mean centre
                (fraction of the image side); 0 = every image copies the references' layout.
scale_spread    RMS of log2(generated size / references' mean size).
drift_px        mean absolute pixel difference (0..1) between images for prompts without the
                concept sampled with and without the LoRA on the same seeds.
drift_attr      fraction of detected attributes (presence, shape, colour, style, background,
                position, size) that changed between those two images.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from .world import Detection

CONTEXT_ATTRS = ("background", "style")
LAYOUT_ATTRS = ("position", "size_name")
ALL_ATTRS = ("present", "shape", "colour", "style", "background", "position", "size_name")


def identity(dets: Sequence[Detection], shape: str, colour: str) -> float:
    if not dets:
        return float("nan")
    return float(np.mean([d.present and d.shape == shape and d.colour == colour for d in dets]))


def identity_any(dets: Sequence[Detection], shapes: Iterable[str], colour: str) -> float:
    """Fraction of images whose object is present in `colour` with any of `shapes`."""
    if not dets:
        return float("nan")
    shapes = set(shapes)
    return float(np.mean([d.present and d.shape in shapes and d.colour == colour for d in dets]))


def attribute_match(dets: Sequence[Detection], requested: Sequence[dict], attrs: Iterable[str]) -> float:
    """Mean over (image, attribute requested in that image's prompt) of detected == requested.

    requested[i]: the attributes the i-th prompt asked for (missing keys were not asked for).
    An absent object matches nothing but the background.
    """
    hits = []
    for d, req in zip(dets, requested):
        for a in attrs:
            if a in req:
                hits.append(getattr(d, a) == req[a] if (d.present or a == "background") else False)
    return float(np.mean(hits)) if hits else float("nan")


def spreads(dets: Sequence[Detection], ref_cx: float, ref_cy: float, ref_size: float) -> tuple[float, float]:
    """(pos_spread, scale_spread) over images with an object; nan if there is none."""
    present = [d for d in dets if d.present]
    if not present:
        return float("nan"), float("nan")
    pos = math.sqrt(np.mean([(d.cx - ref_cx) ** 2 + (d.cy - ref_cy) ** 2 for d in present]))
    scale = math.sqrt(np.mean([math.log2(d.size / ref_size) ** 2 for d in present]))
    return float(pos), float(scale)


def drift_px(images: np.ndarray, prior_images: np.ndarray) -> float:
    """Mean |a - b| / 255 over all pixels of two uint8 image stacks of the same shape."""
    a, b = np.asarray(images, np.float64), np.asarray(prior_images, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).mean() / 255.0)


def drift_attr(dets: Sequence[Detection], prior_dets: Sequence[Detection]) -> float:
    changed = [getattr(d, a) != getattr(p, a) for d, p in zip(dets, prior_dets) for a in ALL_ATTRS]
    return float(np.mean(changed)) if changed else float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value), ignoring nan."""
    v = np.asarray([x for x in values if not (isinstance(x, float) and math.isnan(x))], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
