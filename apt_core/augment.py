"""Adaptive data augmentation of ATA: zoom-out + rotation applied with probability min(gamma_b, p_max).

A zoom-out by s ~ U[zoom_min, zoom_max] shrinks the image to 1/s of the canvas around its centre
and a rotation ~ U[-r, r] degrees turns it; the uncovered border is filled with a constant
(black in pixel space, the latent of black in latent space), by reflection, or by repeating the
edge pixels ("border").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

from .config import AugmentConfig


@dataclass
class AugmentDraw:
    """Random numbers of one step, drawn whether or not they are used (constant RNG use)."""

    coin: torch.Tensor  # (B,) U[0, 1); the sample is augmented when coin < p
    zoom: torch.Tensor  # (B,) s
    angle: torch.Tensor  # (B,) degrees, counter-clockwise


def draw_augmentation(batch: int, cfg: AugmentConfig, generator: torch.Generator) -> AugmentDraw:
    coin = torch.rand(batch, generator=generator)
    zoom = cfg.zoom_min + (cfg.zoom_max - cfg.zoom_min) * torch.rand(batch, generator=generator)
    angle = (2.0 * torch.rand(batch, generator=generator) - 1.0) * cfg.rotation_deg
    return AugmentDraw(coin, zoom, angle)


def zoom_rotate(x: torch.Tensor, zoom: torch.Tensor, angle_deg: torch.Tensor, fill: str = "constant",
                fill_value: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Shrink each image to 1/zoom of the canvas around its centre and rotate it.

    x: (B, C, H, W); zoom, angle_deg: (B,); fill_value: scalar or (C,) used where nothing maps.
    Returns (B, C, H, W) in x's dtype.
    """
    b, c, h, w = x.shape
    work = x.float()
    center = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], device=x.device).expand(b, 2)
    inv_zoom = (1.0 / zoom.to(x.device, torch.float32)).unsqueeze(1).expand(b, 2)
    matrix = get_rotation_matrix2d(center, angle_deg.to(x.device, torch.float32), inv_zoom)
    if fill in ("reflect", "border"):
        mode = "reflection" if fill == "reflect" else "border"
        out = warp_affine(work, matrix, (h, w), padding_mode=mode, align_corners=True)
    else:
        offset = torch.as_tensor(fill_value, dtype=torch.float32, device=x.device)
        offset = offset.view(1, -1, 1, 1) if offset.ndim == 1 else offset
        out = warp_affine(work - offset, matrix, (h, w), padding_mode="zeros", align_corners=True) + offset
    return out.to(x.dtype)


def adaptive_augment(x: torch.Tensor, gamma: torch.Tensor, cfg: AugmentConfig, draw: AugmentDraw,
                     fill_value: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment sample i with probability min(gamma_i, p_max).

    x: (B, C, H, W); gamma: (B,) in [0, 1]. Returns (augmented x, applied mask (B,) bool).
    """
    p = gamma.float().clamp(max=cfg.p_max)
    applied = draw.coin < p
    if not cfg.enabled or not bool(applied.any()):
        return x, torch.zeros_like(applied)
    idx = applied.nonzero().squeeze(1)
    out = x.clone()
    dev_idx = idx.to(x.device)
    out[dev_idx] = zoom_rotate(x[dev_idx], draw.zoom[idx], draw.angle[idx], cfg.fill, fill_value)
    return out, applied
