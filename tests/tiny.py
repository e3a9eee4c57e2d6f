"""Shared builders for tests: a tiny SDXL-shaped model and a cached dataset of generated images."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apt_core.config import AptConfig, AptSwitches, AugmentConfig, TrainConfig
from apt_core.models import cache_dataset
from quality.tiny_model import build_tiny_sdxl


@dataclass
class FakeRecord:
    pixels: torch.Tensor
    caption: str
    original_hw: tuple = (64, 64)
    crop_top_left: tuple = (0, 0)
    target_hw: tuple = (64, 64)
    source: str = "generated"
    repeats: int = 1


def generated_records(n: int = 3, size: int = 64, seed: int = 0) -> list[FakeRecord]:
    """Coloured squares on a fixed background: a subject that is centred and large."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = torch.full((3, size, size), -0.5)
        colour = torch.rand(3, generator=g) * 2 - 1
        lo, hi = size // 4, 3 * size // 4
        img[:, lo:hi, lo:hi] = colour[:, None, None]
        out.append(FakeRecord(img, f"a photo of sks dog {'on grass' if i % 2 else 'in snow'}",
                              (size, size), (0, 0), (size, size)))
    return out


def tiny_model_and_data(seed: int = 0, n_images: int = 3, keep_pixels: bool = False,
                        trigger_words: tuple[str, ...] = (), variants_for: AugmentConfig | None = AugmentConfig()):
    """variants_for: the augmentation settings whose pixel-space variants are cached (the default
    settings' unless given; None: none)."""
    components = build_tiny_sdxl(seed=seed)
    dataset = cache_dataset(components, generated_records(n_images), "cpu", torch.float32,
                            keep_pixels=keep_pixels, trigger_words=trigger_words, variants_for=variants_for)
    return components, dataset


def config(steps: int = 4, switches: AptSwitches | None = None, **train) -> AptConfig:
    cfg = AptConfig(train=TrainConfig(steps=steps, learning_rate=train.pop("learning_rate", 1e-3),
                                      checkpoint_every=train.pop("checkpoint_every", 0), **train),
                    switches=switches or AptSwitches())
    cfg.lora.rank, cfg.lora.alpha = 4, 4.0
    return cfg
