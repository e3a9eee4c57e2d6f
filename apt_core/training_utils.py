"""Short pure helpers of the training step: learning-rate schedule, precision, forward diffusion,
and the checks that a cached dataset fits a config."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .augment import variants_match
from .conditioning import CachedDataset
from .config import AptConfig
from .errors import AptConfigError, AptDatasetError


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Learning rate for 0-based `step`: linear warmup, then constant or cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base_lr


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 natively (NVIDIA Ampere, compute capability 8.0, and newer), not
    through the slow emulation that `torch.cuda.is_bf16_supported()` also counts (T4, V100, RTX 20xx)."""
    if device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no such argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step (None: full fp32). "auto": bf16 where the GPU computes it
    natively, fp16 (with loss scaling, `AptTrainer.scaler`) on other CUDA GPUs, fp32 elsewhere."""
    if mixed_precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[mixed_precision]


def noised(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
           prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward diffusion: (x_t, the fp32 regression target: the noise, or v for v-prediction).

    latents, noise: (B, 4, h, w); alphas_cumprod: (B,), the schedule's value at each sample's t.
    """
    acp = alphas_cumprod.view(-1, 1, 1, 1)
    x_t = acp.sqrt() * latents + (1.0 - acp).sqrt() * noise
    target = noise if prediction_type == "epsilon" else acp.sqrt() * noise - (1.0 - acp).sqrt() * latents
    return x_t, target.float()


def check_trainable(config: AptConfig, dataset: CachedDataset,
                    encode_pixels: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Raise AptDatasetError / AptConfigError unless `dataset` was cached with what `config` needs
    (augmentation variants or pixels, trigger-free captions, class images)."""
    if len(dataset) == 0:
        raise AptDatasetError("the dataset is empty: add 3-10 images of the subject.")
    regs = config.regularizers
    aug = config.augmentation
    if aug is not None and aug.precomputed:
        if not variants_match(dataset, aug):
            raise AptConfigError("pixel-space augmentation needs each image's variants encoded for this "
                                 "zoom/rotation range and variant grid: call apt_core.augment."
                                 "encode_variants after caching, or use augmentation space 'latent'.")
    elif aug is not None and aug.encodes_every_step:
        if encode_pixels is None or any(ex.pixels is None for ex in dataset.examples):
            raise AptConfigError("pixel-space augmentation at every step needs the VAE and cached pixels; "
                                 "use augmentation space 'latent' or cache with keep_pixels=True.")
    if regs.preserves_on_class_images:
        if not dataset.class_examples or len({ex.bucket for ex in dataset.class_examples}) > 1:
            raise AptConfigError("output preservation on class images needs the prior's class images, all of "
                                 "one size: call apt_core.preservation.sample_class_examples before training.")
    elif regs.lambda_preserve > 0 and any(ex.preserve_cond is None for ex in dataset.examples):
        raise AptConfigError("output preservation needs each caption encoded without the trigger word: "
                             "cache the dataset with trigger_words set.")
