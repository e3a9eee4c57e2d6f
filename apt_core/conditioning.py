"""The cached inputs of a training step: SDXL latents and text conditioning per image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class SDXLConditioning:
    """SDXL's text + size conditioning for a batch.

    context:    (B, 77, 2048) penultimate hidden states of CLIP-L and OpenCLIP-bigG, concatenated
    pooled:     (B, 1280) pooled (projected) output of the second text encoder
    time_ids:   (B, 6) original (h, w), crop (top, left), target (h, w) in pixels
    token_mask: (B, 77) bool, True for real tokens (BOS .. first EOS); padding is False
    """

    context: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    token_mask: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SDXLConditioning":
        cast = (lambda t: t.to(device=device, dtype=dtype)) if dtype else (lambda t: t.to(device))
        return SDXLConditioning(cast(self.context), cast(self.pooled), cast(self.time_ids),
                                self.token_mask.to(device))

    @staticmethod
    def cat(items: Sequence["SDXLConditioning"]) -> "SDXLConditioning":
        return SDXLConditioning(
            torch.cat([c.context for c in items]), torch.cat([c.pooled for c in items]),
            torch.cat([c.time_ids for c in items]), torch.cat([c.token_mask for c in items]))


def sdxl_time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int],
                  target_hw: tuple[int, int]) -> torch.Tensor:
    """(1, 6) float time ids in SDXL's order: original size, crop top-left, target size."""
    return torch.tensor([[*original_hw, *crop_top_left, *target_hw]], dtype=torch.float32)


@dataclass
class CachedExample:
    """One training image after caching.

    latent: (4, h, w) VAE latent already multiplied by the VAE scaling factor
    cond:   conditioning with batch dimension 1
    pixels: (3, H, W) in [-1, 1], kept only for pixel-space augmentation
    """

    latent: torch.Tensor
    cond: SDXLConditioning
    caption: str
    source: str = ""
    pixels: torch.Tensor | None = None
    repeats: int = 1  # kohya "N_name" folders: sampled N times as often

    @property
    def bucket(self) -> tuple[int, int]:
        return tuple(self.latent.shape[-2:])  # type: ignore[return-value]


@dataclass
class CachedDataset:
    """Cached examples plus what augmentation needs to fill borders in latent space.

    fill_latent: (4,) per-channel latent of a black image (constant fill in latent space)
    """

    examples: list[CachedExample]
    fill_latent: torch.Tensor = field(default_factory=lambda: torch.zeros(4))

    def __len__(self) -> int:
        return len(self.examples)

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, ex in enumerate(self.examples):
            groups.setdefault(ex.bucket, []).append(i)
        return groups
