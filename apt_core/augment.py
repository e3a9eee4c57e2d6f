"""Adaptive data augmentation of ATA: zoom-out + rotation applied with probability min(gamma_b, p_max).

A zoom-out by s ~ U[zoom_min, zoom_max] shrinks the image to 1/s of the canvas around its centre
and a rotation ~ U[-r, r] degrees turns it; the uncovered border is filled with a constant
(black in pixel space, the latent of black in latent space), by reflection, or by repeating the
edge pixels ("border").

In pixel space the transformed image must be VAE-encoded. Instead of encoding at every augmented
step, `encode_variants` encodes each image once per cell of a (zoom x angle) grid before training;
an augmented step then uses the variant of the cell its drawn zoom and angle fall in
(`variant_index`), so the grid's variants are used with equal probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

from .conditioning import CachedDataset
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


def augment_mask(gamma: torch.Tensor, cfg: AugmentConfig, draw: AugmentDraw) -> torch.Tensor:
    """Which samples are augmented this step: coin < min(gamma_i, p_max). gamma: (B,). Returns (B,) bool."""
    if not cfg.enabled:
        return torch.zeros_like(draw.coin, dtype=torch.bool)
    return draw.coin < gamma.float().cpu().clamp(max=cfg.p_max)


def adaptive_augment(x: torch.Tensor, gamma: torch.Tensor, cfg: AugmentConfig, draw: AugmentDraw,
                     fill_value: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment sample i with probability min(gamma_i, p_max).

    x: (B, C, H, W); gamma: (B,) in [0, 1]. Returns (augmented x, applied mask (B,) bool).
    """
    applied = augment_mask(gamma, cfg, draw)
    if not bool(applied.any()):
        return x, applied
    idx = applied.nonzero().squeeze(1)
    out = x.clone()
    dev_idx = idx.to(x.device)
    out[dev_idx] = zoom_rotate(x[dev_idx], draw.zoom[idx], draw.angle[idx], cfg.fill, fill_value)
    return out, applied


def augment_batch(dataset: CachedDataset, idx: list[int], latents: torch.Tensor, gamma: torch.Tensor,
                  cfg: AugmentConfig, draw: AugmentDraw,
                  encode_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """ATA on one training batch: sample i is zoomed out and rotated with probability min(gamma_i, p_max).

    latents: (B, 4, h, w), the cached latents of `dataset.examples[idx]`, on the training device;
    gamma: (B,). By `cfg.space`: latent space warps the latents; pixel space reads each augmented
    image's variant for the cell its draw falls in (`encode_variants`), or, without a variant grid,
    warps the cached pixels and encodes them with `encode_pixels`.
    Returns (latents, applied (B,) bool); the input is never modified.
    """
    if cfg.space == "latent":
        return adaptive_augment(latents, gamma, cfg, draw, dataset.fill_latent.to(latents.device))
    if cfg.precomputed:
        applied = augment_mask(gamma, cfg, draw)
        if bool(applied.any()):
            cell = variant_index(draw, cfg)
            latents = latents.clone()
            for i in applied.nonzero().squeeze(1).tolist():
                latents[i] = dataset.examples[idx[i]].variants[cell[i]].to(latents.device, latents.dtype)
        return latents, applied
    pixels = torch.stack([dataset.examples[i].pixels for i in idx]).to(latents.device)
    pixels, applied = adaptive_augment(pixels, gamma, cfg, draw, fill_value=-1.0)
    if bool(applied.any()):
        sel = applied.nonzero().squeeze(1).to(latents.device)
        latents = latents.clone()
        latents[sel] = encode_pixels(pixels[sel]).to(latents.dtype)
    return latents, applied


def _grid_levels(cfg: AugmentConfig) -> tuple[int, int]:
    """(zoom levels, angle levels) of the variant grid; a range of width 0 needs one level."""
    nz, na = (int(n) for n in cfg.variant_grid)
    return (nz if cfg.zoom_max > cfg.zoom_min else 1), (na if cfg.rotation_deg > 0 else 1)


def variant_grid(cfg: AugmentConfig) -> torch.Tensor:
    """(zoom, angle) at the centre of each cell of the grid over [zoom_min, zoom_max] x
    [-rotation_deg, rotation_deg]; cell k = zoom_cell * angle_levels + angle_cell.

    Returns (K, 2) float32.
    """
    nz, na = _grid_levels(cfg)
    zoom = cfg.zoom_min + (torch.arange(nz) + 0.5) * (cfg.zoom_max - cfg.zoom_min) / nz
    angle = -cfg.rotation_deg + (torch.arange(na) + 0.5) * (2.0 * cfg.rotation_deg) / na
    zz, aa = torch.meshgrid(zoom, angle, indexing="ij")
    return torch.stack([zz.reshape(-1), aa.reshape(-1)], dim=1).float()


def variant_index(draw: AugmentDraw, cfg: AugmentConfig) -> torch.Tensor:
    """The grid cell holding each drawn (zoom, angle). Returns (B,) int64 rows of `variant_grid`."""
    nz, na = _grid_levels(cfg)

    def cell(value: torch.Tensor, low: float, high: float, n: int) -> torch.Tensor:
        if n == 1:
            return torch.zeros_like(value, dtype=torch.long)
        return ((value - low) / (high - low) * n).floor().long().clamp(0, n - 1)

    zc = cell(draw.zoom, cfg.zoom_min, cfg.zoom_max, nz)
    ac = cell(draw.angle, -cfg.rotation_deg, cfg.rotation_deg, na)
    return zc * na + ac


def wants_variants(cfg: AugmentConfig | None) -> bool:
    """Whether caching should encode variants for cfg: augmentation on, pixel space, pre-encoded."""
    return cfg is not None and cfg.enabled and cfg.precomputed


def variants_match(dataset: CachedDataset, cfg: AugmentConfig) -> bool:
    """Whether every example has variants and they were encoded for cfg's grid (`variant_grid`)."""
    params, want = dataset.variant_params, variant_grid(cfg)
    return params is not None and params.shape == want.shape and torch.allclose(params, want) \
        and all(ex.variants is not None for ex in dataset.examples)


def encode_variants(dataset: CachedDataset, cfg: AugmentConfig,
                    encode: Callable[[torch.Tensor], torch.Tensor], *, fill_value: float = -1.0,
                    batch_size: int = 1, check_interrupt: Callable[[], None] | None = None,
                    keep_pixels: bool = True, progress: Callable[[int, int], None] | None = None) -> None:
    """Encode every example's pixel-space variants once: `ex.variants` (K, 4, h, w), stored like
    `ex.latent` (device, dtype), and `dataset.variant_params` = `variant_grid(cfg)`.

    encode: (n, 3, H, W) pixels in [-1, 1] -> (n, 4, H/8, W/8) scaled latents, as `ex.latent`.
    batch_size images go through the encoder at once (1 keeps the VAE's memory lowest).
    keep_pixels=False drops each `ex.pixels` afterwards (training from variants does not need them).
    progress(done, total): called after each encoder call with the variants encoded so far.
    """
    params = variant_grid(cfg)
    for ex in dataset.examples:
        if ex.pixels is None:
            raise ValueError("encode_variants needs the cached pixels: cache with keep_pixels=True")
    total, done = len(params) * len(dataset.examples), 0
    for ex in dataset.examples:
        chunks = []
        for start in range(0, len(params), batch_size):
            if check_interrupt is not None:
                check_interrupt()
            p = params[start:start + batch_size]
            with torch.no_grad():
                x = ex.pixels[None].expand(len(p), -1, -1, -1)
                x = zoom_rotate(x, p[:, 0], p[:, 1], cfg.fill, fill_value)
                chunks.append(encode(x).to(ex.latent.device, ex.latent.dtype))
            done += len(p)
            if progress is not None:
                progress(done, total)
        ex.variants = torch.cat(chunks)
    dataset.variant_params = params
    if not keep_pixels:
        for ex in dataset.examples:
            ex.pixels = None
