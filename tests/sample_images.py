"""Generated reference photos for the demo and tests: one made-up subject ("sks toy": a striped
ball) that is large and centred on the same background in every shot, i.e. the conditions in
which plain DreamBooth-LoRA overfits. Captions describe the context, as the paper advises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CONTEXTS = ("on a wooden table", "on a wooden table, morning light", "on a wooden table, close-up",
            "on a wooden table, seen from the left", "on a wooden table, seen from the right",
            "on a wooden table, soft shadow")


def striped_ball(size: int, seed: int) -> Image.Image:
    """A size x size RGB photo of the subject; small pose/lighting changes per seed."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (150, 105, 60))  # wooden table
    draw = ImageDraw.Draw(img)
    for y in range(0, size, max(2, size // 16)):  # wood grain
        draw.line([(0, y), (size, y + rng.integers(-2, 3))], fill=(135, 92, 50), width=1)
    r = size * (0.30 + 0.04 * rng.random())
    cx, cy = size / 2 + rng.normal(0, size * 0.02), size / 2 + rng.normal(0, size * 0.02)
    box = [cx - r, cy - r, cx + r, cy + r]
    draw.ellipse(box, fill=(200, 30, 40))
    stripe = max(1, int(r / 3))
    for k in range(-2, 3, 2):  # yellow stripes across the ball
        y0 = cy + k * stripe
        half = (max(r * r - (y0 - cy) ** 2, 0.0)) ** 0.5
        draw.line([(cx - half, y0), (cx + half, y0)], fill=(250, 210, 40), width=max(1, stripe // 2))
    light = int(20 * rng.random())
    return Image.eval(img, lambda v: min(255, v + light))


def write_sample_folder(folder: str | Path, count: int = 5, size: int = 64, trigger: str = "sks",
                        class_word: str = "toy") -> Path:
    """Write `count` images + same-name caption files into folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        striped_ball(size, seed=i).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo of {trigger} {class_word} {CONTEXTS[i % len(CONTEXTS)]}\n")
    return folder
