"""The APT training loop: one object, usable from a background thread, readable top to bottom.

Per step (the order of the method notes):
  sample images, t, noise -> look up gamma_b (before this step's EMA update) -> maybe augment
  -> noise -> prior forward (no grad, LoRA off) -> fine-tuned forward -> losses -> update EMAs.
With output preservation on (not part of APT), a second pair of forwards on the caption without
the trigger word (or on a class image) follows the first backward, so the two graphs are never held
at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .augment import augment_batch, draw_augmentation
from .backbone import Backbone
from .checkpoint import StepRecovery, check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint
from .conditioning import CachedDataset, SDXLConditioning, draw_class_batch
from .config import AptConfig
from .errors import NonFiniteLossError
from .export import SAVE_DTYPES, kohya_metadata, kohya_tensors, save_kohya_lora
from .indicator import OverfittingIndicator
from .probes import AptProbe
from .training_utils import autocast_dtype, check_trainable, lr_at, noised


@dataclass
class ProgressEvent:
    """What the trainer reports after every logged step (plain numbers, JSON-ready)."""

    step: int
    total_steps: int
    loss: float
    loss_denoise: float
    loss_rs: float
    loss_aa: float
    gamma: list[float]
    aug_rate: float  # fraction of samples augmented over the last 50
    loss_weight: float  # mean (1 - gamma) weight applied this step
    lr: float
    it_per_s: float
    eta_s: float
    timesteps: list[int] = field(default_factory=list)
    loss_preserve: float = 0.0  # lambda_preserve * L_preserve (0 when output preservation is off)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BatchLosses:
    """One batch's objective and its parts (scalars unless noted)."""

    total: torch.Tensor
    denoise: torch.Tensor  # mean of the (1 - gamma)-weighted per-sample denoising losses
    rs: torch.Tensor  # lambda_RS * L_RS
    aa: torch.Tensor  # lambda_AA * L_AA
    rs_raw: torch.Tensor  # L_RS before lambda_RS (its gradient is measurable at lambda 0)
    aa_raw: torch.Tensor  # L_AA before lambda_AA
    loss_pre: torch.Tensor | None  # (B,) the prior's denoising loss, None when nothing needs it
    loss_ft: torch.Tensor  # (B,) the fine-tuned model's denoising loss
    weight: torch.Tensor  # (B,) the loss weights applied, on the CPU


@dataclass
class Batch:
    """One step's training batch, as the losses see it."""

    examples: list  # the cached examples drawn
    latents: torch.Tensor  # (B, 4, h, w) fp32 on the device, augmented where `augmented`
    cond: SDXLConditioning  # batch B, on the device in the UNet's dtype
    t: torch.Tensor  # (B,) timesteps, on the CPU
    noise: torch.Tensor  # (B, 4, h, w) on the device
    bins: torch.Tensor  # (B,) the indicator's bin of each t
    gamma: torch.Tensor  # (B,) gamma of each bin before this step's update, on the CPU
    augmented: torch.Tensor  # (B,) bool


@dataclass
class TrainResult:
    steps_done: int
    stopped: bool
    checkpoint: Path | None
    gammas: list[float]
    history: list[dict]


class AptTrainer:
    def __init__(self, backbone: Backbone, dataset: CachedDataset, config: AptConfig, *,
                 checkpoint_dir: str | Path | None = None,
                 on_event: Callable[[ProgressEvent], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 encode_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 on_checkpoint_step: Callable[[int], None] | None = None,
                 on_step: Callable[[int], None] | None = None,
                 data_fingerprint: str | None = None):
        self.config = config.validate()
        check_trainable(self.config, dataset, encode_pixels)
        self.backbone = backbone
        self.dataset = dataset
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_event = on_event
        self.should_stop = should_stop
        self.encode_pixels = encode_pixels
        # Called with the step number at every periodic checkpoint (each `checkpoint_every` steps),
        # just before that checkpoint is written, e.g. to save the LoRA of that step too. Before, so
        # that a run that fails in the hook resumes from the previous checkpoint and calls it again.
        self.on_checkpoint_step = on_checkpoint_step
        # Called with the step number after every step (and its checkpoint), between steps: e.g. to
        # render previews. What it does must not touch the training state.
        self.on_step = on_step
        # What the training images and captions were (images.records_fingerprint): a checkpoint made
        # from other data is not resumed.
        self.data_fingerprint = data_fingerprint
        self.device = torch.device(backbone.device)  # the host's compute device, not where weights rest
        self.amp_dtype = autocast_dtype(config.train.mixed_precision, self.device)
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.indicator = OverfittingIndicator(config.indicator)
        sw = config.switches
        self.probe = AptProbe(sw.representation_stabilization, sw.attention_alignment,
                              config.regularizers.aa_distance, config.regularizers.aa_head_average)
        self._probe_handle, self._restore_checkpointing = None, None
        self.lora = backbone.attach_lora(config.lora, config.train.seed)
        try:  # whatever is installed is taken out again if a later part fails
            self.lora.set_input_cast(self.amp_dtype is None)
            self._alphas_cumprod = backbone.alphas_cumprod.to(self.device)
            self._probe_handle = backbone.attach_probe(self.probe, config.regularizers.up_block_factors) \
                if self.probe.active else None
            if config.train.gradient_checkpointing:
                self._restore_checkpointing = bool(getattr(backbone.unet, "is_gradient_checkpointing", False))
                backbone.set_gradient_checkpointing(True)
        except BaseException:
            self.close()
            raise
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=config.train.learning_rate,
                                           weight_decay=config.train.weight_decay, fused=fused or None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step_idx = 0
        self.history: list[dict] = []
        self.recovery = StepRecovery(self.checkpoint_dir)  # what a failed step leaves to resume from
        self._stop = threading.Event()
        self._augmented: deque[bool] = deque(maxlen=50)
        self._step_times: deque[float] = deque(maxlen=20)
        self._weights = torch.tensor([float(getattr(ex, "repeats", 1)) for ex in dataset.examples])

    # ---- control -------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (thread-safe)."""
        self._stop.set()

    def _stop_requested(self) -> bool:
        return self._stop.is_set() or bool(self.should_stop and self.should_stop())

    # ---- one step ------------------------------------------------------------------------
    def _sample_batch(self) -> list[int]:
        """First image by repeat-weighted draw, the rest from the same bucket (same latent size)."""
        first = int(torch.multinomial(self._weights, 1, generator=self.generator))
        if self.config.train.batch_size == 1:
            return [first]
        same = torch.tensor(self.dataset.buckets()[self.dataset.examples[first].bucket])
        rest = torch.multinomial(self._weights[same], self.config.train.batch_size - 1,
                                 replacement=True, generator=self.generator)
        return [first] + same[rest].tolist()

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return self.backbone.predict(x_t, t, cond)

    @property
    def unet_dtype(self) -> torch.dtype:
        """The host UNet's weight dtype: what its inputs (x_t, conditioning) are cast to."""
        return self.backbone.dtype

    def next_batch(self) -> Batch:
        """Draw the images, timesteps, noise and augmentation of one step (in this order, from the
        run's generator) and augment where the indicator says so."""
        cfg = self.config
        idx = self._sample_batch()
        examples = [self.dataset.examples[i] for i in idx]
        latents = torch.stack([ex.latent for ex in examples]).to(self.device, torch.float32)
        cond = SDXLConditioning.cat([ex.cond for ex in examples]).to(self.device, self.unet_dtype)
        b = latents.shape[0]
        t = torch.randint(0, cfg.indicator.num_train_timesteps, (b,), generator=self.generator)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        draw = draw_augmentation(b, cfg.augment, self.generator)
        bins = self.indicator.bin_of(t)
        gamma = self.indicator.gamma_for(bins)
        augmented = torch.zeros(b, dtype=torch.bool)
        if cfg.switches.adaptive_augmentation:
            latents, augmented = augment_batch(self.dataset, idx, latents, gamma, cfg.augment, draw,
                                               self.encode_pixels)
        return Batch(examples, latents, cond, t, noise, bins, gamma, augmented)

    def batch_losses(self, latents: torch.Tensor, cond: SDXLConditioning, t: torch.Tensor,
                     noise: torch.Tensor, gamma: torch.Tensor) -> BatchLosses:
        """The objective's terms for one batch: prior forward (no grad, LoRA off), fine-tuned forward.

        latents, noise: (B, 4, h, w) fp32 on the device, latents already augmented; t, gamma: (B,)
        on the CPU, gamma the indicator's value for each sample's bin. Call it between
        `probe.begin_step` and `probe.end_step` (the RS/AA terms read what the probe recorded).
        """
        cfg, sw = self.config, self.config.switches
        b = latents.shape[0]
        t_dev = t.to(self.device)
        x_t, target = noised(latents, noise, self._alphas_cumprod[t_dev], self.backbone.prediction_type)
        x_t = x_t.to(self.unet_dtype)
        loss_pre = None
        if sw.needs_prior:
            with torch.no_grad(), self.lora.disabled(), self.probe.recording("prior"):
                pred_pre = self._forward(x_t, t_dev, cond)
            loss_pre = (pred_pre.float() - target).pow(2).mean(dim=(1, 2, 3))
        with self.probe.recording("ft"):
            pred_ft = self._forward(x_t, t_dev, cond)
        loss_ft = (pred_ft.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        weight = torch.ones(b)
        if sw.adaptive_loss_weight:
            weight = (1.0 - gamma).clamp(min=cfg.loss_weight_floor)
        denoise = (weight.to(self.device) * loss_ft).mean()
        rs_raw, aa_raw = self.probe.losses(self.device)
        rs, aa = cfg.regularizers.lambda_rs * rs_raw, cfg.regularizers.lambda_aa * aa_raw
        return BatchLosses(denoise + rs + aa, denoise, rs, aa, rs_raw, aa_raw, loss_pre, loss_ft, weight)

    def preservation_term(self, batch: Batch) -> torch.Tensor:
        """lambda_preserve * L_preserve for this step (a scalar; 0 when output preservation is off),
        on this step's noisy latents or on class images (`_preservation_batch`)."""
        lam = self.config.regularizers.lambda_preserve
        if lam <= 0:
            return torch.zeros(())
        latents, cond, t, noise = self._preservation_batch(batch)
        return lam * self.preservation_loss(latents, cond.to(self.device, self.unet_dtype), t, noise)

    def preservation_loss(self, latents: torch.Tensor, keep_cond: SDXLConditioning, t: torch.Tensor,
                          noise: torch.Tensor) -> torch.Tensor:
        """L_preserve: MSE between the fine-tuned and the prior's (LoRA off, no grad) predictions for
        the caption without the trigger word, on the same noisy latent as the denoising loss.

        latents, noise: (B, 4, h, w) fp32 on the device (latents as augmented); t: (B,) on the CPU.
        Returns a scalar (before lambda_preserve).
        """
        t_dev = t.to(self.device)
        x_t, _ = noised(latents, noise, self._alphas_cumprod[t_dev], self.backbone.prediction_type)
        x_t = x_t.to(self.unet_dtype)
        with torch.no_grad(), self.lora.disabled():
            pred_pre = self._forward(x_t, t_dev, keep_cond)
        pred_ft = self._forward(x_t, t_dev, keep_cond)
        return (pred_ft.float() - pred_pre.float()).pow(2).mean()

    def _preservation_batch(self, batch: Batch) -> tuple[torch.Tensor, SDXLConditioning, torch.Tensor, torch.Tensor]:
        """What output preservation trains on this step: (latents, conditioning, t, noise).

        With class images, B of them drawn at random, each with its own t and noise; otherwise this
        step's (augmented) latents, t and noise with each caption's trigger-free conditioning.
        The class draws come from a generator of (seed, step), not the training generator, so the
        run's own draws are the same with preservation on or off, and a resumed run replays them.
        """
        if self.config.regularizers.preserves_on_class_images:
            g = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + self.step_idx)
            lat, cond, t, noise = draw_class_batch(self.dataset.class_examples, batch.latents.shape[0],
                                                   self.config.indicator.num_train_timesteps, g)
            return lat.to(self.device, torch.float32), cond, t, noise.to(self.device)
        return batch.latents, SDXLConditioning.cat([ex.preserve_cond for ex in batch.examples]), batch.t, batch.noise

    def _backward(self, loss: torch.Tensor) -> None:
        """Backward of one loss term (scaled under fp16); a NaN/inf term ends the run (NonFiniteLossError)."""
        if not torch.isfinite(loss):
            self._diverged()
        self.scaler.scale(loss).backward()

    def _diverged(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(self.step_idx + 1, self.save_last_good(diverged=True),
                                 self.recovery.kept_earlier_step)

    def _optimizer_step(self) -> float:
        """Clip, step at this step's learning rate; returns the rate."""
        cfg = self.config.train
        lr = lr_at(self.step_idx, cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lora.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm) and self.amp_dtype != torch.float16:  # fp16: the scaler skips it
            self._diverged()
        self.recovery.begin_update()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def train_step(self) -> ProgressEvent:
        """One step: batch, forward and losses, backward, optimizer step, indicator update."""
        started = time.perf_counter()
        self.recovery.begin_step(self.generator.get_state())
        batch = self.next_batch()
        self.probe.begin_step(batch.cond.aligned_tokens)
        try:
            terms = self.batch_losses(batch.latents, batch.cond, batch.t, batch.noise, batch.gamma)
            self._backward(terms.total)
        finally:
            self.probe.end_step()
        preserve = self.preservation_term(batch)  # its own forward and backward, after the main one's
        if self.config.regularizers.lambda_preserve > 0:
            self._backward(preserve)
        lr = self._optimizer_step()
        if terms.loss_pre is not None:
            self.indicator.update(batch.bins.tolist(), terms.loss_pre.tolist(), terms.loss_ft.detach().tolist())
        self.step_idx += 1
        self.recovery.end_step(self.step_idx, self.lora.parameters(), lambda: self._state(self.generator.get_state()))
        self._augmented.extend(batch.augmented.tolist())
        self._step_times.append(time.perf_counter() - started)
        return self._event(*(float(x.detach()) for x in (terms.total + preserve.to(terms.total.device),
                                                         terms.denoise, terms.rs, terms.aa, preserve)),
                           terms.weight, lr, batch.t)

    def _event(self, loss: float, loss_denoise: float, loss_rs: float, loss_aa: float, loss_preserve: float,
               weight: torch.Tensor, lr: float, t: torch.Tensor) -> ProgressEvent:
        sec = sorted(self._step_times)[len(self._step_times) // 2]
        remaining = self.config.train.steps - self.step_idx
        return ProgressEvent(
            step=self.step_idx, total_steps=self.config.train.steps, loss=loss,
            loss_denoise=loss_denoise, loss_rs=loss_rs, loss_aa=loss_aa,
            gamma=self.indicator.gammas(), aug_rate=sum(self._augmented) / max(1, len(self._augmented)),
            loss_weight=float(weight.mean()), lr=lr, it_per_s=1.0 / sec if sec > 0 else 0.0,
            eta_s=remaining * sec, timesteps=t.tolist(), loss_preserve=loss_preserve)

    # ---- the loop ------------------------------------------------------------------------
    def run(self, final_checkpoint: bool = True) -> TrainResult:
        """Train until config.train.steps, a stop request, or an error; checkpoint on the way (and at
        the end unless `final_checkpoint` is off: a caller that saves the LoRA first does it after)."""
        every = self.config.train.checkpoint_every
        last_ckpt: Path | None = None
        stopped = False
        while self.step_idx < self.config.train.steps:
            if self._stop_requested():
                stopped = True
                break
            event = self.train_step()
            if self.step_idx % self.config.train.log_every == 0 or self.step_idx == self.config.train.steps:
                self.history.append(event.to_dict())
                if self.on_event:
                    self.on_event(event)
            if every and self.step_idx % every == 0:
                if self.on_checkpoint_step:
                    self.on_checkpoint_step(self.step_idx)
                last_ckpt = self.save_checkpoint()
            if self.on_step:
                self.on_step(self.step_idx)
        if final_checkpoint and self.checkpoint_dir is not None and (
                stopped or self.step_idx == self.config.train.steps):
            last_ckpt = self.save_checkpoint()
        return TrainResult(self.step_idx, stopped, last_ckpt, self.indicator.gammas(), self.history)

    # ---- checkpoints ---------------------------------------------------------------------
    def _state(self, rng_state: torch.Tensor) -> dict:
        return {"step": self.step_idx, "lora": self.lora.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "indicator": self.indicator.state_dict(), "rng": rng_state,
                "augmented": list(self._augmented), "config": self.config.to_dict(), "data": self.data_fingerprint,
                "history": self.history}

    def save_checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        return save_checkpoint(self.checkpoint_dir, self.step_idx, self._state(self.generator.get_state()))

    def save_last_good(self, diverged: bool = False) -> Path | None:
        """Checkpoint the last consistent state after a step failed or was interrupted mid-way (NaN/inf
        loss, out of memory, a host's Cancel inside the forward); between steps the same as
        `save_checkpoint`. See `StepRecovery.save_last_good`."""
        return self.recovery.save_last_good(
            self.step_idx, self.lora.parameters(),
            lambda rng: self._state(self.generator.get_state() if rng is None else rng), self.history, diverged)

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (default: newest in checkpoint_dir); returns the step it resumes at."""
        if path is None:
            path = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
            if path is None:
                return 0
        state = load_checkpoint(path)
        check_resumable(path, state, self.config.to_dict(), self.data_fingerprint)
        self.lora.load_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and self.scaler.is_enabled():  # empty when the saved run used no loss scaling
            self.scaler.load_state_dict(state["scaler"])
        self.indicator.load_state_dict(state["indicator"])
        self.generator.set_state(state["rng"])
        self._augmented.extend(state["augmented"])
        self.history = list(state["history"])
        self.step_idx = int(state["step"])
        return self.step_idx

    # ---- output --------------------------------------------------------------------------
    def lora_tensors(self, save_dtype: str = "fp16") -> dict[str, torch.Tensor]:
        return kohya_tensors(self.lora.state_dict(), self.config.lora.alpha, self.backbone.kohya_key,
                             SAVE_DTYPES[save_dtype])

    def save_lora(self, path: str | Path, output_name: str | None = None, save_dtype: str = "fp16") -> Path:
        meta = kohya_metadata(self.config.lora.rank, self.config.lora.alpha, steps=self.step_idx,
                              learning_rate=self.config.train.learning_rate,
                              num_images=len(self.dataset), output_name=output_name or Path(path).stem,
                              apt_settings=self.config.to_dict(), gammas=self.indicator.gammas(),
                              captions=[e.caption for e in self.dataset.examples])
        return save_kohya_lora(path, self.lora_tensors(save_dtype), meta)

    def close(self) -> None:
        """Remove hooks and LoRA layers: the UNet is left exactly as it was handed in."""
        if self._probe_handle is not None:
            self._probe_handle.remove()
            self._probe_handle = None
        if self._restore_checkpointing is not None:
            self.backbone.set_gradient_checkpointing(self._restore_checkpointing)
            self._restore_checkpointing = None
        self.lora.remove()
