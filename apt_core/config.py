"""Settings of an APT run, grouped by the paper's parts.

Every *project decision* of `docs/apt-method.md` is a field here with a documented default,
so the node pack, the command line and the benchmarks all speak the same vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import AptConfigError


@dataclass
class IndicatorConfig:
    """Overfitting indicator (ATA, stated by the paper): per-bin EMA of L_pre and L_ft."""

    num_bins: int = 10
    ema_alpha: float = 0.1
    scale: float = 1000.0  # S; the paper uses T for SDXL and T/10 for SD 2.1
    num_train_timesteps: int = 1000

    def validate(self) -> None:
        if self.num_bins < 1:
            raise AptConfigError(f"indicator bins must be >= 1, got {self.num_bins}.")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise AptConfigError(f"EMA alpha must be in (0, 1], got {self.ema_alpha}.")
        if self.scale <= 0:
            raise AptConfigError(f"indicator scale S must be > 0, got {self.scale}.")


FILL_MODES = ("constant", "reflect", "border")


@dataclass
class AugmentConfig:
    """Adaptive augmentation: with probability min(gamma_b, p_max) zoom out and rotate."""

    enabled: bool = True
    p_max: float = 1.0
    zoom_min: float = 1.0  # s ~ U[zoom_min, zoom_max]; the image shrinks to 1/s of the canvas
    zoom_max: float = 3.0
    rotation_deg: float = 15.0  # rotation ~ U[-rotation_deg, +rotation_deg]
    # "border" repeats the edge pixels outward, extending the background. Default because the
    # paper's black ("constant") frame is learned as content: in the quality benchmark it kept
    # APT from learning the concept at all and doubled drift (quality/README.md, "black fill").
    fill: Literal["constant", "reflect", "border"] = "border"
    # "pixel" (default, the paper's order): the image is zoomed/rotated, then VAE-encoded. "latent":
    # the cached latent is transformed instead; cheaper, but in the quality benchmark a warped
    # latent decodes to another shape and colour and APT lost most of the likeness
    # (quality/README.md, "latent-space augmentation").
    space: Literal["latent", "pixel"] = "pixel"
    # Pixel space only: (zoom levels, angle levels) of a grid of variants encoded once per image
    # before training; an augmented step uses the variant whose grid cell holds its drawn zoom and
    # angle, so training needs neither the VAE nor per-step encodes (memory as in latent space).
    # (0, 0) re-encodes the exactly drawn transform at every augmented step (the VAE stays loaded).
    # In the quality benchmark 8 x 3 matched per-step encoding (quality/README.md, "pre-encoded").
    variant_grid: tuple[int, int] = (8, 3)

    @property
    def precomputed(self) -> bool:
        """Whether pixel-space augmentation draws from pre-encoded variants (variant_grid)."""
        return self.space == "pixel" and tuple(self.variant_grid) != (0, 0)

    @property
    def encodes_every_step(self) -> bool:
        """Whether pixel-space augmentation encodes the drawn transform at every augmented step."""
        return self.space == "pixel" and not self.precomputed

    def validate(self) -> None:
        if not 0.0 <= self.p_max <= 1.0:
            raise AptConfigError(f"p_max must be in [0, 1], got {self.p_max}.")
        if not 1.0 <= self.zoom_min <= self.zoom_max:
            raise AptConfigError(
                f"zoom range must satisfy 1 <= min <= max, got [{self.zoom_min}, {self.zoom_max}].")
        if self.rotation_deg < 0:
            raise AptConfigError(f"rotation range must be >= 0 degrees, got {self.rotation_deg}.")
        if self.fill not in FILL_MODES:
            raise AptConfigError(f"fill mode must be one of {FILL_MODES}, got {self.fill!r}.")
        if self.space not in ("latent", "pixel"):
            raise AptConfigError(f"augmentation space must be 'latent' or 'pixel', got {self.space!r}.")
        grid = tuple(self.variant_grid)
        if len(grid) != 2 or any(int(n) != n for n in grid) or not (grid == (0, 0) or min(grid) >= 1):
            raise AptConfigError(f"variant grid must be two levels >= 1 (zoom, angle), or (0, 0) to "
                                 f"encode every augmented step, got {self.variant_grid!r}.")


@dataclass
class RegularizerConfig:
    """Representation Stabilization and Attention Alignment weights and where they look."""

    # 0.01, not 1: in the quality benchmark RS's gradient at lambda 1 is 15-45 x the denoising
    # gradient and stops the concept; at 0.01 the concept is learned as without RS and the prompt's
    # layout is kept (quality/README.md, "lambda_RS 0.01"). The paper gives no value.
    lambda_rs: float = 0.01
    # 0.01, not 1, for the same reason: at lambda 1 AA's gradient grows to ~24 x the denoising
    # gradient as the LoRA learns the concept, and the concept is learned far less (5 of 5 seeds);
    # 0.01 costs the least of 0.01 / 0.1 / 1 (quality/README.md, "lambda_AA").
    lambda_aa: float = 0.01
    # Decoder stages by downsampling factor of the latent: 4 -> 32x32 and 2 -> 64x64 at 1024 px
    # (diffusers up_blocks.0 / up_blocks.1, SGM output_blocks 0-2 / 3-5).
    up_block_factors: tuple[int, ...] = (4, 2)
    # KL, not MSE: MSE of attention probabilities averaged over ~77 tokens is ~1e-5 of the
    # denoising loss at lambda 1, a measured no-op (quality/README.md, "Project decisions").
    aa_distance: Literal["mse", "kl"] = "kl"
    aa_head_average: bool = False
    # Words (e.g. the trigger word) whose tokens AA leaves out, so the new token's attention may
    # move onto the concept while every other token keeps the prior's map. Empty = all tokens,
    # as in the paper. Applied when the captions are encoded (cache_dataset).
    aa_free_words: tuple[str, ...] = ()
    # Output preservation, an addition to APT, off by default: on the same noisy latent, the LoRA's
    # prediction for the caption *without* `trigger_words` is pulled towards the prior's (LoRA off);
    # DreamBooth's prior preservation without class images. Meant for what no APT part targets, the
    # concept leaking into prompts that do not name it. In the quality benchmark (lambda 1) it gave
    # back the style asked for and halved noise-prediction drift but cost the subject's colour, and
    # pixel drift did not fall (quality/README.md, "Output preservation"). Costs two more UNet
    # forwards (one without gradient) and a backward per step.
    lambda_preserve: float = 0.0
    # The words removed from each caption to build the preservation prompt ("a sks dog on the
    # beach" -> "a dog on the beach"); every caption must contain one of them.
    trigger_words: tuple[str, ...] = ()
    # Where output preservation looks: 0 = on the references' own noisy latents; N > 0 = on N images
    # the prior draws before training from the captions without the trigger word (DreamBooth's
    # class images; `apt_core.preservation.sample_class_examples`).
    class_images: int = 0

    @property
    def preserves_on_class_images(self) -> bool:
        """Whether output preservation is on and trains on class images (not the references)."""
        return self.lambda_preserve > 0 and self.class_images > 0

    @property
    def preservation_words(self) -> tuple[str, ...]:
        """The trigger words to cache preservation prompts (each caption without them) for: none
        while preservation is off or trains on class images, which bring their own conditioning."""
        return self.trigger_words if self.lambda_preserve > 0 and not self.preserves_on_class_images else ()

    def validate(self) -> None:
        if self.lambda_rs < 0 or self.lambda_aa < 0 or self.lambda_preserve < 0:
            raise AptConfigError("lambda_RS, lambda_AA and the preservation weight must be >= 0.")
        if self.class_images < 0:
            raise AptConfigError(f"the number of class images must be >= 0, got {self.class_images}.")
        if not self.up_block_factors:
            raise AptConfigError("at least one up-block resolution must be hooked for RS/AA.")
        if self.aa_distance not in ("mse", "kl"):
            raise AptConfigError(f"AA distance must be 'mse' or 'kl', got {self.aa_distance!r}.")
        if any(not isinstance(w, str) or not w.strip() or len(w.split()) != 1 for w in self.aa_free_words):
            raise AptConfigError(f"AA free words must be single non-empty words, got {list(self.aa_free_words)}.")
        if any(not isinstance(w, str) or not w.strip() or len(w.split()) != 1 for w in self.trigger_words):
            raise AptConfigError(f"trigger words must be single non-empty words, got {list(self.trigger_words)}.")
        if self.lambda_preserve > 0 and not self.trigger_words:
            raise AptConfigError("output preservation needs the trigger word (e.g. 'sks'): it trains on "
                                 "each caption with the trigger word removed.")


@dataclass
class AptSwitches:
    """Each APT part on/off. All off is plain DreamBooth-LoRA (the paper's "Base")."""

    adaptive_augmentation: bool = True
    adaptive_loss_weight: bool = True
    representation_stabilization: bool = True
    attention_alignment: bool = True
    # Track gamma even when nothing uses it (costs the prior forward); useful for baselines.
    track_indicator: bool = False

    @classmethod
    def baseline(cls) -> "AptSwitches":
        return cls(False, False, False, False)

    @property
    def needs_prior(self) -> bool:
        return (self.adaptive_augmentation or self.adaptive_loss_weight
                or self.representation_stabilization or self.attention_alignment
                or self.track_indicator)


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    # What gets a LoRA: every transformer block's attention projections (to_q, to_k, to_v, to_out.0;
    # the same names in diffusers and ComfyUI), plus the two switches below. The backbone finds the
    # modules (`Backbone.lora_target_names`).
    include_feed_forward: bool = False
    # LoCon-style LoRA also on the 3x3 convolutions of every UNet resnet (conv1/conv2, SGM
    # in_layers.2/out_layers.3); exported as 4-D kohya keys that ComfyUI's LoraLoader reads.
    # Off by default (the paper trains the attention projections only). The quality benchmark
    # needs it: its prior draws shapes at an 8x8 level without attention (quality/README.md).
    include_conv: bool = False

    def validate(self) -> None:
        if int(self.rank) != self.rank or self.rank <= 0:
            raise AptConfigError(f"LoRA rank must be a positive integer, got {self.rank}. Try 16 or 32.")
        if self.alpha <= 0:
            raise AptConfigError(f"LoRA alpha must be > 0, got {self.alpha}. Use the rank as a default.")


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    # cosine, not constant: in the quality benchmark (report_world128c_cosine) it made the final LoRA
    # 2-3x less dependent on where the run stopped, cut the noise-prediction drift from the prior by
    # 37-54 % and moved the concept's identity only within the seed-to-seed spread
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float = 1.0
    seed: int = 0
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    log_every: int = 1

    def validate(self) -> None:
        if self.steps < 1:
            raise AptConfigError(f"steps must be >= 1, got {self.steps}.")
        if self.batch_size < 1:
            raise AptConfigError(f"batch size must be >= 1, got {self.batch_size}.")
        if self.learning_rate <= 0:
            raise AptConfigError(f"learning rate must be > 0, got {self.learning_rate}.")
        if self.lr_schedule not in ("constant", "cosine"):
            raise AptConfigError(f"lr schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}.")
        if self.checkpoint_every < 0:
            raise AptConfigError("checkpoint interval must be >= 0 (0 disables periodic checkpoints).")


@dataclass
class AptConfig:
    """Everything a run needs besides the model and the data."""

    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    indicator: IndicatorConfig = field(default_factory=IndicatorConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    switches: AptSwitches = field(default_factory=AptSwitches)
    loss_weight_floor: float = 0.0  # w = max(1 - gamma_b, floor)

    @property
    def augmentation(self) -> AugmentConfig | None:
        """The augmentation settings when ATA's augmentation runs (switch on and enabled), else None."""
        return self.augment if self.switches.adaptive_augmentation and self.augment.enabled else None

    def validate(self) -> "AptConfig":
        for part in (self.train, self.lora, self.indicator, self.augment, self.regularizers):
            part.validate()
        if not 0.0 <= self.loss_weight_floor <= 1.0:
            raise AptConfigError(f"loss-weight floor must be in [0, 1], got {self.loss_weight_floor}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AptConfig":
        known_parts = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        sub = {"train": TrainConfig, "lora": LoraConfig, "indicator": IndicatorConfig,
               "augment": AugmentConfig, "regularizers": RegularizerConfig, "switches": AptSwitches}
        for name, value in data.items():
            if name not in known_parts:
                raise AptConfigError(f"unknown setting {name!r}.")
            if name in sub:
                known = {f.name for f in dataclasses.fields(sub[name])}
                unknown = set(value) - known
                if unknown:
                    raise AptConfigError(f"unknown {name} settings: {sorted(unknown)}.")
                value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                kwargs[name] = sub[name](**value)
            else:
                kwargs[name] = value
        return cls(**kwargs)
