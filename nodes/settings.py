"""Node settings <-> `apt_core.AptConfig`, and the LoRA file name / folder rules (no ComfyUI imports)."""

from __future__ import annotations

import dataclasses
import re
import unicodedata

from apt_core.config import (AptConfig, AptSwitches, AugmentConfig, IndicatorConfig, LoraConfig,
                             RegularizerConfig, TrainConfig)
from apt_core.errors import AptConfigError

# Memory/speed presets in plain words -> TrainConfig fields.
PRESETS = {
    "Fastest (24 GB+ VRAM)": {"gradient_checkpointing": False},
    "Low VRAM (12-16 GB): gradient checkpointing": {"gradient_checkpointing": True},
}
DEFAULT_PRESET = "Fastest (24 GB+ VRAM)"

# Hooked decoder resolutions for RS/AA, by latent downsampling factor (1024 px image: 128 latent).
RESOLUTIONS = {
    "32x32 + 64x64 (paper)": (4, 2),
    "32x32 only (cheaper)": (4,),
    "64x64 only": (2,),
}
DEFAULT_RESOLUTIONS = "32x32 + 64x64 (paper)"

LR_SCHEDULES = ("constant", "cosine")
# The node's precision choices -> TrainConfig.mixed_precision.
PRECISIONS = {"auto": "auto", "bf16": "bf16", "fp16": "fp16", "fp32": "no"}
# The node's augmentation-space choices -> (AugmentConfig.space, AugmentConfig.variant_grid). apt_core
# also augments cached latents (space "latent"); the benchmark found that costs the likeness, so the
# node does not offer it.
AUG_SPACES = {"pixel": ("pixel", AugmentConfig.variant_grid), "pixel_every_step": ("pixel", (0, 0))}


def ata_settings(*, num_bins: int, ema_alpha: float, indicator_scale: float, p_max: float,
                 zoom_min: float, zoom_max: float, rotation_deg: float, fill: str,
                 adaptive_augmentation: bool, adaptive_loss_weight: bool,
                 track_indicator: bool = False, space: str = "pixel") -> dict:
    """The APT_ATA_SETTINGS value (validated now, so a bad value errors on the settings node).
    space: one of AUG_SPACES."""
    if space not in AUG_SPACES:
        raise AptConfigError(f"augmentation space must be one of {sorted(AUG_SPACES)}, got {space!r}.")
    space, grid = AUG_SPACES[space]
    ind = IndicatorConfig(num_bins=int(num_bins), ema_alpha=float(ema_alpha), scale=float(indicator_scale))
    aug = AugmentConfig(enabled=bool(adaptive_augmentation), p_max=float(p_max), zoom_min=float(zoom_min),
                        zoom_max=float(zoom_max), rotation_deg=float(rotation_deg), fill=fill,
                        space=space, variant_grid=grid)
    ind.validate()
    aug.validate()
    return {"indicator": dataclasses.asdict(ind), "augment": dataclasses.asdict(aug),
            "switches": {"adaptive_augmentation": bool(adaptive_augmentation),
                         "adaptive_loss_weight": bool(adaptive_loss_weight),
                         "track_indicator": bool(track_indicator)}}


def reg_settings(*, lambda_rs: float, lambda_aa: float, resolutions: str = DEFAULT_RESOLUTIONS,
                 class_preservation: float = 0.0, class_images: int = 32, trigger_word: str = "sks") -> dict:
    """The APT_REG_SETTINGS value. A weight of 0 switches its regularizer off (no hooks, no cost).
    class_preservation > 0: prior preservation on `class_images` images the base model draws from the
    captions without `trigger_word` (off at 0)."""
    if resolutions not in RESOLUTIONS:
        raise AptConfigError(f"unknown resolutions {resolutions!r}; choose one of {list(RESOLUTIONS)}.")
    preserve = float(class_preservation) > 0
    if preserve and int(class_images) < 1:
        raise AptConfigError("class preservation needs at least 1 class image (32 in the benchmark).")
    if preserve and not (trigger_word or "").strip():
        raise AptConfigError("class preservation needs the trigger word of your captions (e.g. 'sks', as in "
                             "APT Caption): it is removed from each caption to get the class prompt.")
    reg = RegularizerConfig(lambda_rs=float(lambda_rs), lambda_aa=float(lambda_aa),
                            up_block_factors=RESOLUTIONS[resolutions],
                            lambda_preserve=float(class_preservation),
                            trigger_words=(trigger_word.strip(),) if preserve else (),
                            class_images=int(class_images) if preserve else 0)
    reg.validate()
    return {"regularizers": dataclasses.asdict(reg),
            "switches": {"representation_stabilization": reg.lambda_rs > 0,
                         "attention_alignment": reg.lambda_aa > 0}}


def build_config(*, steps: int, rank: int, learning_rate: float, seed: int, checkpoint_every: int,
                 preset: str, ata: dict | None = None, reg: dict | None = None, batch_size: int = 1,
                 lr_schedule: str = TrainConfig.lr_schedule, warmup_steps: int = 0,
                 precision: str = "auto") -> AptConfig:
    """Everything the trainer node knows -> a validated AptConfig (paper defaults elsewhere)."""
    if preset not in PRESETS:
        raise AptConfigError(f"unknown memory preset {preset!r}; choose one of {list(PRESETS)}.")
    if warmup_steps < 0:
        raise AptConfigError(f"warmup steps must be >= 0, got {warmup_steps}.")
    if precision not in PRECISIONS:
        raise AptConfigError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}.")
    train = TrainConfig(steps=int(steps), learning_rate=float(learning_rate), seed=int(seed),
                        checkpoint_every=int(checkpoint_every), batch_size=int(batch_size),
                        lr_schedule=lr_schedule, warmup_steps=int(warmup_steps),
                        mixed_precision=PRECISIONS[precision], **PRESETS[preset])
    cfg = AptConfig(train=train, lora=LoraConfig(rank=int(rank), alpha=float(rank)))
    switches = dataclasses.asdict(AptSwitches())
    if ata:
        cfg.indicator = IndicatorConfig(**ata["indicator"])
        cfg.augment = AugmentConfig(**ata["augment"])
        switches.update(ata["switches"])
    if reg:
        r = dict(reg["regularizers"])
        r["up_block_factors"] = tuple(r["up_block_factors"])
        r["aa_free_words"], r["trigger_words"] = tuple(r["aa_free_words"]), tuple(r["trigger_words"])
        cfg.regularizers = RegularizerConfig(**r)
        switches.update(reg["switches"])
    cfg.switches = AptSwitches(**switches)
    cfg.augment.enabled = cfg.switches.adaptive_augmentation
    return cfg.validate()


_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def sanitize_lora_name(name: str) -> str:
    """User text -> a safe file name '<stem>.safetensors' (no folders, no odd characters)."""
    stem = unicodedata.normalize("NFC", (name or "").strip())
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    stem = re.sub(r"[^\w.\-]+", "_", stem)  # path separators, spaces, ':' ... -> _
    # File names are limited in bytes (255 on most file systems) and the step files and the temp file
    # of an atomic save add ~30: keep the stem to 100 bytes of UTF-8, cut on a character boundary.
    stem = re.sub(r"_+", "_", stem).strip("._-").encode("utf-8")[:100].decode("utf-8", "ignore").rstrip("._-")
    if not stem:
        raise AptConfigError(f"LoRA name {name!r} has no usable characters; use letters, digits, '-' or '_'.")
    if stem.split(".")[0].lower() in _RESERVED:
        stem += "_lora"
    return stem + ".safetensors"


def step_lora_name(lora_file: str, step: int) -> str:
    """The LoRA saved at a periodic checkpoint: 'apt_lora.safetensors', 300 -> 'apt_lora_step00300.safetensors'."""
    return f"{lora_file[: -len('.safetensors')]}_step{int(step):05d}.safetensors"


def is_step_lora_name(lora_file: str, name: str) -> bool:
    """Whether `name` is one of `lora_file`'s step files (as `step_lora_name` writes them)."""
    stem = re.escape(lora_file[: -len(".safetensors")])
    return re.fullmatch(stem + r"_step\d{5,}\.safetensors", name) is not None
