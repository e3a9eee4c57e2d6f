"""Draw docs/apt_method.png: one APT training step as the README's picture of the method.

    python scripts/draw_apt_diagram.py [--out docs/apt_method.png]

Pure Pillow drawing (no plotting library); the content follows ../shared/docs/apt-method.md and
apt_core (indicator.py, augment.py, regularizers.py, trainer.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 1160, 660
INK, MUTED, PAPER = (34, 34, 40), (110, 110, 120), (255, 255, 255)
ATA, RS, AA, MODEL = (32, 150, 130), (230, 140, 30), (225, 80, 140), (70, 100, 200)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def box(draw: ImageDraw.ImageDraw, xy: tuple[int, int, int, int], text: str,
        colour: tuple[int, int, int], size: int = 15) -> None:
    """A rounded box with a coloured border and centred multi-line text."""
    x0, y0, x1, y1 = xy
    tint = tuple(int(255 - 0.12 * (255 - c)) for c in colour)
    draw.rounded_rectangle(xy, radius=10, fill=tint, outline=colour, width=3)
    draw.multiline_text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=INK, font=font(size),
                        anchor="mm", align="center", spacing=5)


def arrow(draw: ImageDraw.ImageDraw, points: list[tuple[int, int]], colour=INK,
          label: str = "", label_at: int = 0) -> None:
    """A polyline with an arrow head at its last point; optional label near segment label_at."""
    draw.line(points, fill=colour, width=2, joint="curve")
    (xa, ya), (xb, yb) = points[-2], points[-1]
    length = max(((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5, 1e-6)
    ux, uy = (xb - xa) / length, (yb - ya) / length
    head = [(xb, yb), (xb - 11 * ux + 5 * uy, yb - 11 * uy - 5 * ux),
            (xb - 11 * ux - 5 * uy, yb - 11 * uy + 5 * ux)]
    draw.polygon(head, fill=colour)
    if label:
        (xa, ya), (xb, yb) = points[label_at], points[label_at + 1]
        draw.text(((xa + xb) / 2 + 8, (ya + yb) / 2), label, fill=colour, font=font(14), anchor="lm")


def draw_diagram() -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT), PAPER)
    d = ImageDraw.Draw(img)
    d.text((20, 14), "One APT training step (Chae et al., CVPR 2025) as implemented in apt_core",
           fill=INK, font=font(20))

    box(d, (20, 60, 230, 150), "reference photo\n+ context caption\n(latents, text cached)", MUTED)
    box(d, (290, 60, 600, 150), "adaptive augmentation (ATA)\nwith p = min(gamma_b, p_max):\n"
        "zoom out x1-3, rotate +-15 deg", ATA)
    box(d, (660, 60, 930, 150), "noise eps at timestep t\n(t falls in bin b of 10)", MUTED)
    arrow(d, [(230, 105), (290, 105)])
    arrow(d, [(600, 105), (660, 105)])

    box(d, (470, 230, 790, 320), "same UNet, LoRA switched OFF\n= the pretrained prior (no grad)", MODEL)
    box(d, (830, 230, 1140, 320), "same UNet, LoRA ON\n(the model being trained)", MODEL)
    arrow(d, [(795, 150), (795, 190), (630, 190), (630, 230)])
    arrow(d, [(795, 190), (985, 190), (985, 230)])
    d.text((810, 170), "same x_t, caption, t", fill=MUTED, font=font(13), anchor="lm")

    bus_y = 365
    d.line([(125, bus_y), (985, bus_y)], fill=INK, width=2)
    d.line([(630, 320), (630, bus_y)], fill=INK, width=2)
    d.line([(985, 320), (985, bus_y)], fill=INK, width=2)
    d.text((640, 342), "noise predictions, decoder features, cross-attention maps",
           fill=MUTED, font=font(13), anchor="lm")

    box(d, (20, 400, 440, 510), "overfitting indicator per bin (ATA)\nEMA (alpha 0.1) of L_pre and L_ft\n"
        "gamma_b = clamp(1 - exp(-S (EMA_pre - EMA_ft)), 0, 1)", ATA, size=14)
    box(d, (470, 400, 790, 510), "representation stabilization (RS)\nchannel mean and std of decoder\n"
        "features: trained -> prior", RS, size=14)
    box(d, (830, 400, 1140, 510), "attention alignment (AA)\ncross-attention over all prompt\n"
        "tokens: trained -> prior", AA, size=14)
    for x in (125, 630, 985):
        arrow(d, [(x, bus_y), (x, 400)])

    arrow(d, [(60, 400), (60, 185), (445, 185), (445, 150)], colour=ATA, label="gamma_b", label_at=0)

    box(d, (20, 560, 1140, 640), "L = (1 - gamma_b) * ||eps - eps_LoRA-on||^2  +  lambda_RS * L_RS  "
        "+  lambda_AA * L_AA\nonly the LoRA weights get gradients; all three parts off = plain "
        "DreamBooth-LoRA", INK, size=16)
    for x, c in ((230, ATA), (630, RS), (985, AA)):
        arrow(d, [(x, 510), (x, 560)], colour=c)
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "apt_method.png"))
    args = ap.parse_args()
    draw_diagram().save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
