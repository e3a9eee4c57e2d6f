"""Figures with Pillow only (no plotting dependency): image grids and simple line charts."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = {"prior": (120, 120, 120), "baseline": (214, 39, 40), "ata": (255, 127, 14),
           "ata_rs": (44, 160, 44), "apt": (31, 119, 180)}
_FONT = ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, s: str) -> tuple[int, int]:
    box = draw.textbbox((0, 0), s, font=_FONT)
    return box[2] - box[0], box[3] - box[1]


def image_row(label: str, images: Sequence[np.ndarray], cell: int, label_w: int) -> Image.Image:
    row = Image.new("RGB", (label_w + cell * len(images), cell), "white")
    d = ImageDraw.Draw(row)
    d.text((4, cell // 2 - 6), label, fill="black", font=_FONT)
    for i, im in enumerate(images):
        row.paste(Image.fromarray(np.asarray(im)).resize((cell - 2, cell - 2), Image.NEAREST),
                  (label_w + i * cell + 1, 1))
    return row


def grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], cell: int = 84, label_w: int = 130,
         header: Sequence[str] | None = None) -> Image.Image:
    width = label_w + cell * max(len(r[1]) for r in rows)
    head_h = 42 if header else 0
    out = Image.new("RGB", (width, head_h + cell * len(rows)), "white")
    d = ImageDraw.Draw(out)
    if header:
        for i, h in enumerate(header):
            for j, line in enumerate(_wrap(h, cell)):
                d.text((label_w + i * cell + 2, 1 + 10 * j), line, fill="black", font=_FONT)
    for k, (label, ims) in enumerate(rows):
        out.paste(image_row(label, ims, cell, label_w), (0, head_h + k * cell))
    return out


def _wrap(s: str, width_px: int, char_px: int = 6) -> list[str]:
    words, lines, cur = s.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width_px // char_px and cur:
            lines.append(cur)
            cur = w
        else:
            cur = (cur + " " + w).strip()
    lines.append(cur)
    return lines[:4]


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
               title: str, size: tuple[int, int] = (300, 200), xlabel: str = "",
               colours: dict[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """series: {name: (xs, ys, stds or None)}; a shaded band of +-std where given."""
    colours = colours or PALETTE
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 42, 8, 18, 24
    d.text((left, 2), title, fill="black", font=_FONT)
    xs_all = [x for xs, _, _ in series.values() for x in xs]
    ys_all = [y + s * sign for xs, ys, ss in series.values() for y, s in zip(ys, ss or [0] * len(ys))
              for sign in (-1, 1) if not math.isnan(y)]
    if not xs_all or not ys_all:
        return img
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x1 = x1 if x1 > x0 else x0 + 1
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda y: top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline=(180, 180, 180))
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        d.text((2, py(yv) - 5), f"{yv:.3g}", fill=(80, 80, 80), font=_FONT)
    d.text((left, h - 12), f"{x0:g}", fill=(80, 80, 80), font=_FONT)
    d.text((w - right - 30, h - 12), f"{x1:g} {xlabel}", fill=(80, 80, 80), font=_FONT)
    for name, (xs, ys, ss) in series.items():  # all bands first, so no band hides a line
        col = colours.get(name, (0, 0, 0))
        if ss:
            band = [(px(x), py(y + s)) for x, y, s in zip(xs, ys, ss) if not math.isnan(y)] + \
                   [(px(x), py(y - s)) for x, y, s in reversed(list(zip(xs, ys, ss))) if not math.isnan(y)]
            if len(band) >= 3:
                light = tuple(int(c + (255 - c) * 0.8) for c in col)
                d.polygon(band, fill=light)
    for name, (xs, ys, ss) in series.items():
        col = colours.get(name, (0, 0, 0))
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if not math.isnan(y)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=col)
    return img


def legend(names: Sequence[str], labels: dict[str, str], width: int) -> Image.Image:
    img = Image.new("RGB", (width, 18), "white")
    d = ImageDraw.Draw(img)
    x = 4
    for n in names:
        col = PALETTE.get(n, (0, 0, 0))
        d.rectangle([x, 5, x + 12, 13], fill=col)
        d.text((x + 16, 3), labels.get(n, n), fill="black", font=_FONT)
        x += 22 + text_size(d, labels.get(n, n))[0]
    return img


def stack(images: Sequence[Image.Image], vertical: bool = True, pad: int = 6) -> Image.Image:
    if vertical:
        w, h = max(i.width for i in images), sum(i.height for i in images) + pad * (len(images) - 1)
    else:
        w, h = sum(i.width for i in images) + pad * (len(images) - 1), max(i.height for i in images)
    out = Image.new("RGB", (w, h), "white")
    pos = 0
    for im in images:
        out.paste(im, (0, pos) if vertical else (pos, 0))
        pos += (im.height if vertical else im.width) + pad
    return out
