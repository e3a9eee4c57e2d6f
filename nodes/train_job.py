"""One APT training run inside ComfyUI: encode once, train the host's UNet in place, export.

`TrainJob.prepare()` does the cheap checks (model type, file name, resume plan) so a bad input
fails before anything heavy runs; `TrainJob.run()` does the work and is meant for a worker thread
(`run_in_worker`): training needs autograd, and ComfyUI runs nodes under `torch.inference_mode()`,
which is thread-local, so a fresh thread starts clean (the body still sets inference_mode(False)).

Stopping:
- Cancel (POST /interrupt) sets ComfyUI's global flag. The loop stops before the next step; if the
  flag lands mid-step, ComfyUI's own ops raise InterruptProcessingException inside the forward, the
  half step is dropped and the state *before* it is checkpointed. Either way a resumable checkpoint
  is written and the node raises the interrupt, so ComfyUI marks the prompt cancelled.
- POST /apt/runs/{node_id}/stop stops after the current step, checkpoints, writes the LoRA with the
  steps done so far and lets the node finish normally.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from apt_core.augment import variant_grid
from apt_core.checkpoint import check_resumable, latest_checkpoint, list_checkpoints, load_checkpoint
from apt_core.config import AptConfig
from apt_core.errors import AptDatasetError, AptError, AptOutputError
from apt_core.export import remove_stale_temps
from apt_core.images import records_fingerprint
from apt_core.preservation import CLASS_CACHE_NAME, class_examples, class_prompts, load_or_draw_class_latents

from .comfy_backbone import ComfySDXLBackbone, check_comfy_sdxl, release_patcher, training_patcher
from .dataset import AptDataset
from .encoding import cache_dataset, class_conditionings, pixel_encoder
from .previews import PREVIEW_DIR, Previewer, preview_prompts
from .runs import RUNS, RunState, send
from .settings import is_step_lora_name, step_lora_name

log = logging.getLogger("apt_lora_trainer")
_STEP = re.compile(r"step_(\d+)\.pt$")


class AptOutOfMemoryError(AptError):
    """Training ran out of (GPU) memory; the message says what to lower."""


@dataclass
class JobResult:
    lora_file: str | None
    lora_path: Path | None
    steps_done: int
    total_steps: int
    resumed_from: int
    stopped: bool
    cancelled: bool
    checkpoint: str | None
    gammas: list[float]
    history: list[dict] = field(default_factory=list)
    step_files: list[str] = field(default_factory=list)  # LoRAs saved at checkpoints by this run
    preview_seconds: float = 0.0  # time this run spent rendering previews

    def summary(self) -> dict[str, Any]:
        return {"lora_name": self.lora_file, "steps_done": self.steps_done, "total_steps": self.total_steps,
                "resumed_from": self.resumed_from, "stopped": self.stopped, "cancelled": self.cancelled,
                "checkpoint": self.checkpoint, "final_gamma": self.gammas, "step_files": self.step_files,
                "preview_seconds": round(self.preview_seconds, 3)}


def run_in_worker(fn: Callable[[], Any], name: str = "apt-train") -> Any:
    """Run fn in a new thread (with the caller's contextvars, so ComfyUI's progress hook knows the
    node) and wait for it. Blocking on purpose: while an async node is pending, ComfyUI 0.3.75 runs
    the prompt's other ready nodes, and one of them could sample, re-patch or evict the very model
    being trained."""
    ctx = contextvars.copy_context()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = ctx.run(fn)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box.pop("error")
    return box.get("result")


def checkpoint_step(path: Path) -> int:
    m = _STEP.search(Path(path).name)
    return int(m.group(1)) if m else 0


def release_memory() -> None:
    """Give memory a finished/failed run held back: collect dropped tensors (an exception's frames
    can keep a step's activations in reference cycles), then ComfyUI's soft_empty_cache, which
    empties the CUDA caching allocator (torch.cuda.empty_cache) when CUDA is available."""
    import gc

    import comfy.model_management as mm

    gc.collect()
    mm.soft_empty_cache()


def _save_quietly(trainer) -> Path | None:
    """trainer.save_last_good(), never raising (it runs while another error is being reported)."""
    if trainer.step_idx == 0:
        return None  # nothing trained yet
    try:
        return trainer.save_last_good()
    except Exception:  # noqa: BLE001 - the OOM message matters more than this checkpoint
        log.warning("APT: could not save a checkpoint after running out of memory", exc_info=True)
        return None


def _step_files_text(names: list[str], every: int) -> str:
    """'; also saved 3 step LoRAs: a, b, c' for the run's final message ('' when there are none)."""
    if not names:
        return ""
    shown = ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]} (every {every} steps)"
    return f"; also saved {len(names)} step LoRA{'s' if len(names) > 1 else ''}: {shown}"


@contextlib.contextmanager
def _in_training():
    """ComfyUI's `in_training` flag (v0.33+; its ops pick autograd-safe paths while it is set)."""
    import comfy.model_management as mm

    had = hasattr(mm, "in_training")
    before = getattr(mm, "in_training", False)
    if had:
        mm.in_training = True
    try:
        yield
    finally:
        if had:
            mm.in_training = before


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


class PhaseProgress:
    """A long phase before the first step (encoding the images and their variants, drawing class
    images): 'encoding images and variants 40/100, about 12s left' in the node's status line and chart
    (apt.status, at most every MIN_INTERVAL) and ComfyUI's progress bar. Call it with (done, total)."""

    MIN_INTERVAL = 0.5  # seconds between status messages

    def __init__(self, run: RunState, node_id: str, what: str):
        self.run, self.node_id, self.what = run, node_id, what
        self.t0 = time.monotonic()
        self.sent = float("-inf")
        self.pbar = None

    def __call__(self, done: float, total: int) -> None:
        import comfy.utils

        now = time.monotonic()
        n = int(done)
        text = f"{self.what} {n}/{total}"
        if 0 < done < total:
            text += f", about {_duration((now - self.t0) / done * (total - done))} left"
        RUNS.update(self.run, message=text)
        if done >= total or now - self.sent >= self.MIN_INTERVAL:
            self.sent = now
            send("apt.status", self.run.summary())
        if self.pbar is None:
            self.pbar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self.pbar.update_absolute(n, total)


@contextlib.contextmanager
def _elapsed_status(run: RunState, what: str, every: float = 1.0):
    """A phase the host gives no counts for (loading the model): '<what> (12s)' in the node every
    `every` seconds while the block runs, so a slow load does not look like a hang."""
    t0, done = time.monotonic(), threading.Event()

    def tick() -> None:
        while not done.wait(every):
            RUNS.update(run, message=f"{what} ({_duration(time.monotonic() - t0)})")
            send("apt.status", run.summary())

    RUNS.update(run, message=what)
    send("apt.status", run.summary())
    ticker = threading.Thread(target=tick, name="apt-status", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class TrainJob:
    def __init__(self, *, model, clip, vae, dataset: AptDataset, config: AptConfig, lora_file: str,
                 loras_dir: str | Path, checkpoint_dir: str | Path, overwrite: bool, resume: bool,
                 node_id: str, prompt_id: str | None = None, save_step_loras: bool = False,
                 preview_every: int = 0, preview_prompts: str = ""):
        self.model, self.clip, self.vae = model, clip, vae
        self.dataset, self.config = dataset, config
        self.lora_file = lora_file
        self.loras_dir = Path(loras_dir)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.overwrite, self.resume = bool(overwrite), bool(resume)
        # Also save '<name>_stepNNNNN.safetensors' into loras_dir at every periodic checkpoint.
        self.save_step_loras = bool(save_step_loras)
        # Previews every N steps (0: off), of the artist's prompts (one per line) or the defaults.
        self.preview_every = max(0, int(preview_every))
        self.preview_prompts = preview_prompts
        self.previewer: Previewer | None = None
        self.step_files: list[str] = []
        self.node_id, self.prompt_id = str(node_id), prompt_id
        self.resume_from: Path | None = None
        self.data_fingerprint: str | None = None  # set by prepare()
        self.run_state: RunState | None = None
        self._cancel_seen = False
        self._oom_checkpoint: Path | None = None
        self._oom_step: int | None = None

    @property
    def target(self) -> Path:
        return self.loras_dir / self.lora_file

    def existing_step_files(self) -> list[Path]:
        """This LoRA name's step files in loras_dir ('<name>_stepNNNNN.safetensors'), oldest step first."""
        if not self.loras_dir.is_dir():
            return []
        found = [p for p in self.loras_dir.iterdir() if is_step_lora_name(self.lora_file, p.name)]
        return sorted(found, key=lambda p: (len(p.name), p.name))  # same stem: more digits = later step

    # ---- cheap checks, in the calling thread -------------------------------------------------
    def prepare(self) -> "TrainJob":
        check_comfy_sdxl(self.model)
        if not isinstance(self.dataset, AptDataset) or len(self.dataset) == 0:
            raise AptDatasetError("The dataset is empty: add 3-10 images of the subject.")
        regs = self.config.regularizers
        if regs.preserves_on_class_images:  # every caption must name the trigger word
            class_prompts([r.caption for r in self.dataset.records], regs.trigger_words)
        latest = latest_checkpoint(self.checkpoint_dir)
        step = checkpoint_step(latest) if latest is not None else 0
        self.data_fingerprint = records_fingerprint(self.dataset.records)  # what a checkpoint must match
        total = self.config.train.steps
        if latest is not None and self.resume and (step < total or (step == total and not self.target.exists())):
            self.resume_from = latest  # unfinished, or finished but its LoRA was never written (disk full)
            # A checkpoint of other images or settings is refused now, before anything is encoded.
            check_resumable(latest, load_checkpoint(latest), self.config.to_dict(), self.data_fingerprint)
        # temp files of a killed save: this LoRA's and its step files', and the run's checkpoints'
        remove_stale_temps(self.loras_dir, lambda n: n == self.lora_file or is_step_lora_name(self.lora_file, n))
        remove_stale_temps(self.checkpoint_dir)
        if self.target.exists() and not self.overwrite and self.resume_from is None:
            raise AptOutputError(f"A LoRA named {self.lora_file} already exists in {self.loras_dir}. "
                                 "Choose another LoRA name, or turn on 'overwrite'.")
        # Step files belong to their run: a resumed run may replace its own, a fresh one may not
        # silently replace (or mix with) those of an earlier run of the same name.
        old_steps = (self.existing_step_files() if self.save_step_loras and self.config.train.checkpoint_every
                     and self.resume_from is None else [])
        if old_steps and not self.overwrite:
            names = ", ".join(p.name for p in old_steps[:3]) + (" ..." if len(old_steps) > 3 else "")
            raise AptOutputError(f"Step LoRAs of an earlier run named {self.lora_file} already exist in "
                                 f"{self.loras_dir} ({names}). Choose another LoRA name, or turn on "
                                 "'overwrite' (this deletes them).")
        for old in old_steps:
            log.info("APT: overwrite is on; deleting the earlier run's step LoRA %s", old)
            old.unlink(missing_ok=True)
        if latest is not None and self.resume_from is None:
            why = ("resume is off" if not self.resume else
                   f"it already reached {step} of {self.config.train.steps} steps")
            log.info("APT: starting %s from scratch (%s); removing old checkpoints in %s",
                     self.lora_file, why, self.checkpoint_dir)
            for old in list_checkpoints(self.checkpoint_dir):
                old.unlink(missing_ok=True)
        if self.resume_from is None:  # a new run: the previews of an earlier one under this name go
            shutil.rmtree(self.checkpoint_dir / PREVIEW_DIR, ignore_errors=True)
        self.run_state = RUNS.start(self.node_id, prompt_id=self.prompt_id, lora_name=self.lora_file,
                                    total_steps=self.config.train.steps)
        return self

    # ---- the work, in a worker thread --------------------------------------------------------
    def run(self) -> JobResult:
        import comfy.model_management as mm

        run = self.run_state or self.prepare().run_state
        oom: str | None = None
        try:
            with torch.inference_mode(False), torch.enable_grad():
                return self._run(run)
        except mm.InterruptProcessingException:
            if run.status != "cancelled":  # cancelled while encoding: nothing to resume yet
                RUNS.update(run, status="cancelled", message="cancelled before training started")
                send("apt.status", run.summary())
            raise
        except Exception as exc:
            if _is_oom(exc):
                oom = str(exc).splitlines()[0][:300]
            else:
                RUNS.update(run, status="error", message=str(exc))
                send("apt.status", run.summary())
                raise
        finally:
            release_memory()
        # Raised outside the except block, so the failing step's tensors are already released.
        cfg = self.config
        where = (f"at step {self._oom_step + 1} of {cfg.train.steps}" if self._oom_step is not None
                 else "while preparing the training")
        if self._oom_checkpoint is not None:
            kept = (f" The {self._oom_step} finished step(s) are saved in {self._oom_checkpoint}: with 'resume' "
                    "on, the Low VRAM preset continues from there; the other changes below alter what is "
                    "trained, so they start over (turn 'resume' off or use a new LoRA name).")
        else:
            kept = " Checkpoints saved before the failure are kept."
        tips = [] if cfg.train.gradient_checkpointing else [
            "the 'Low VRAM (12-16 GB): gradient checkpointing' memory preset"]
        if cfg.train.batch_size > 1:
            tips.append("batch size 1")
        tips += ["a lower resolution on 'APT Dataset Loader' (e.g. 768)", "a smaller rank (e.g. 16)",
                 "only 32x32 in 'APT Regularization weights'"]
        if cfg.augmentation is not None and cfg.augmentation.encodes_every_step:
            tips.append("augmentation space 'pixel' (pre-encoded variants: no VAE during training)")
        batch = f", batch size {cfg.train.batch_size}" if cfg.train.batch_size > 1 else ""
        msg = (f"Out of GPU memory {where} (training at {self.dataset.resolution} px, LoRA rank "
               f"{cfg.lora.rank}{batch}). Try, in this order: " + "; ".join(tips) +
               ". Close other programs using the GPU." + kept + f" (PyTorch: {oom})")
        RUNS.update(run, status="error", message=msg)
        send("apt.status", run.summary())
        raise AptOutOfMemoryError(msg)

    def _should_stop(self, run: RunState) -> bool:
        import comfy.model_management as mm

        if mm.processing_interrupted():
            self._cancel_seen = True
            return True
        return run.stop_requested

    def _class_examples(self, run: RunState, backbone: ComfySDXLBackbone, prompts: list[str],
                        conds: list, uncond) -> list:
        """The class images the base model draws for preservation, or those it drew for an earlier
        run of this LoRA name on the same model, captions and resolution (kept with the checkpoints)."""
        import comfy.model_management as mm

        def on_draw() -> None:
            RUNS.update(run, message=f"drawing {len(prompts)} class images with the base model")
            send("apt.status", run.summary())
            log.info("APT: drawing %d class images with the base model", len(prompts))

        side = self.dataset.resolution // 8
        cache = self.checkpoint_dir / CLASS_CACHE_NAME
        latents, reused = load_or_draw_class_latents(
            backbone, prompts, conds, uncond, (side, side), cache, on_draw=on_draw,
            check_interrupt=mm.throw_exception_if_processing_interrupted,
            progress=PhaseProgress(run, self.node_id, "drawing class images"))
        if reused:
            log.info("APT: reusing the %d class images drawn for an earlier run (%s)", len(prompts), cache)
        return class_examples(latents, conds, prompts)

    def _render_previews(self, run: RunState, step: int) -> None:
        """Render and announce the previews of `step`. A failure (out of memory, disk full...) turns
        previews off for the rest of the run, never the training; Cancel goes through."""
        import comfy.model_management as mm

        RUNS.update(run, message=f"rendering {len(self.previewer.prompts)} previews of step {step}")
        send("apt.status", run.summary())
        name = step_lora_name(self.lora_file, step)
        try:
            rendered = self.previewer.render(step, name if name in self.step_files else None,
                                             should_stop=lambda: run.stop_requested)
            images = [self._viewable(p.to_dict()) for p in rendered]
        except mm.InterruptProcessingException:
            raise
        except Exception as exc:  # noqa: BLE001 - a preview is never worth the run
            log.warning("APT: previews turned off for this run: rendering step %d failed: %s", step, exc)
            self.previewer = None
            mm.soft_empty_cache()
            RUNS.update(run, message=f"previews turned off: {exc}")
            send("apt.status", run.summary())
            return
        RUNS.update(run, previews=run.previews + images, message="training")
        send("apt.previews", {"node": self.node_id, "prompt_id": self.prompt_id, "step": step, "images": images})

    def _final_previews(self, run: RunState, step: int) -> None:
        """The previews of the step the run ended at, after its LoRA is saved (Cancel skips them)."""
        import comfy.model_management as mm

        if self.previewer is None or any(p.step == step for p in self.previewer.images):
            return
        try:
            self._render_previews(run, step)
        except mm.InterruptProcessingException:
            log.info("APT: cancelled while rendering the last previews; the LoRA is saved")

    def _preview_eta(self, step: int, total: int) -> float:
        """Seconds the previews still to come will take, at this run's average per preview step."""
        p = self.previewer
        if p is None or not p.renders:
            return 0.0
        # preview steps after `step`: the multiples of preview_every up to `total`, and `total` itself
        every = self.preview_every
        left = total // every - step // every + (1 if total % every and step < total else 0)
        return left * p.seconds / p.renders

    def _viewable(self, preview: dict) -> dict:
        """A preview with the query ComfyUI's /view serves it by (type output, subfolder of the run)."""
        import folder_paths

        path = (self.checkpoint_dir / preview["file"]).resolve()
        out = Path(folder_paths.get_output_directory()).resolve()
        if out in path.parents:
            preview["view"] = {"filename": path.name, "subfolder": path.parent.relative_to(out).as_posix(),
                               "type": "output"}
        return preview

    def _save_lora_then_checkpoint(self, run: RunState, trainer, steps_text: str) -> tuple[Path, str | None, str]:
        """The finished training, saved so that no failure loses it: the LoRA first, then the final
        checkpoint, each tried whatever happened to the other. A LoRA that cannot be written leaves
        the checkpoint, from which the next queue writes it without training again."""
        lora_error = ckpt_error = None
        path = ckpt = None
        try:
            path = trainer.save_lora(self.target, output_name=Path(self.lora_file).stem)
        except AptOutputError as exc:
            lora_error = exc
        try:
            ckpt = trainer.save_checkpoint()
        except AptOutputError as exc:
            ckpt_error = exc
        if lora_error is not None:
            total, done = self.config.train.steps, trainer.step_idx
            again = ("the LoRA is written from it without training again" if done == total else
                     f"with 'steps' set to {done} the LoRA of step {done} is written from it without training "
                     f"(with {total}, training continues to step {total})")
            kept = (f" The training is kept in {ckpt}: once there is room, queue again with the same LoRA name "
                    f"and 'resume' on, and {again}."
                    if ckpt is not None else f" The final checkpoint could not be saved either: {ckpt_error}")
            RUNS.update(run, status="error", message=f"{lora_error}{kept}{steps_text}")
            send("apt.status", run.summary())
            raise AptOutputError(f"{lora_error}{kept}") from lora_error
        note = ""
        if ckpt_error is not None:
            log.warning("APT: the LoRA is saved, but the final checkpoint is not: %s", ckpt_error)
            note = f" (the final checkpoint could not be saved: {ckpt_error})"
        return path, str(ckpt) if ckpt else None, note

    def _run(self, run: RunState) -> JobResult:
        import comfy.model_management as mm

        cfg = self.config
        aug = cfg.augmentation
        pixel_aug = aug is not None and aug.encodes_every_step
        n = len(self.dataset)
        variants = aug is not None and aug.precomputed
        what = f"{n} image(s)" + (f" and their {n * len(variant_grid(aug))} augmentation variants" if variants else "")
        RUNS.update(run, status="encoding", message=f"encoding {what}")
        send("apt.status", run.summary())
        log.info("APT: encoding %s and the captions", what)
        backbone_check = ComfySDXLBackbone(self.model)  # shapes only; does not load anything
        cached = cache_dataset(list(self.dataset.records), self.model.model, self.clip, self.vae,
                               context_dim=backbone_check.context_dim,
                               adm_channels=backbone_check.adm_channels,
                               check_interrupt=mm.throw_exception_if_processing_interrupted,
                               on_item=PhaseProgress(run, self.node_id, "encoding images and variants" if variants
                                                     else "encoding images"),
                               keep_pixels=pixel_aug, variants_for=aug,
                               aa_free_words=cfg.regularizers.aa_free_words)
        regs = cfg.regularizers
        class_draw = None
        if regs.preserves_on_class_images:
            class_draw = class_conditionings(self.clip, self.model.model, [r.caption for r in self.dataset.records],
                                             regs.trigger_words, regs.class_images, self.dataset.resolution)
        if self.preview_every:  # the prompts are encoded now, while the text encoders are in use anyway
            prompts = preview_prompts([r.caption for r in self.dataset.records], self.dataset.subject,
                                      self.preview_prompts)
            res = self.dataset.resolution
            self.previewer = Previewer(None, self.vae, self.clip, prompts, self.checkpoint_dir, (res, res),
                                       seed=cfg.train.seed)
            self.previewer.encode()

        # A clone (or, under dynamic VRAM, the host's non-dynamic delegate) carries the LoRA adapters
        # and attention patches; the shared MODEL is never changed. Pixel-space augmentation at every
        # step re-encodes with the VAE during training: load it together with the UNet, so that no
        # later load can push the UNet being trained out of GPU memory.
        patcher = training_patcher(self.model)
        try:
            return self._train(run, patcher, cached, class_draw, pixel_aug)
        finally:
            if patcher.model is not self.model.model:  # a dynamic MODEL's delegate: free its memory now
                release_patcher(patcher)

    def _train(self, run: RunState, patcher, cached, class_draw, pixel_aug: bool) -> JobResult:
        import comfy.model_management as mm
        import comfy.utils

        from apt_core.trainer import AptTrainer

        cfg = self.config
        backbone = ComfySDXLBackbone(patcher, also_load=(self.vae.patcher,) if pixel_aug else ())
        if class_draw is not None:  # drawn by the model as it is, before the adapters exist
            with _elapsed_status(run, f"loading the model onto {backbone.device}"):
                backbone.load()
            cached.class_examples = self._class_examples(run, backbone, *class_draw)

        pbar = comfy.utils.ProgressBar(cfg.train.steps, node_id=self.node_id)
        log_every = max(1, cfg.train.steps // 20)

        def on_event(event) -> None:
            d = event.to_dict()
            d["eta_s"] += self._preview_eta(event.step, event.total_steps)
            RUNS.add_event(run, d)
            send("apt.progress", {"node": self.node_id, "prompt_id": self.prompt_id, "status": run.status,
                                  "lora_name": self.lora_file, **d})
            if event.step % log_every == 0 or event.step == event.total_steps:
                log.info("APT %s step %d/%d loss %.4f (denoise %.4f rs %.4g aa %.4g) mean gamma %.3f "
                         "%.2f it/s", self.lora_file, event.step, event.total_steps, event.loss,
                         event.loss_denoise, event.loss_rs, event.loss_aa,
                         sum(event.gamma) / max(1, len(event.gamma)), event.it_per_s)
            try:
                pbar.update_absolute(event.step, event.total_steps)
            except mm.InterruptProcessingException:
                # ComfyUI's progress hook raises and clears the Cancel flag: keep it for _should_stop.
                mm.interrupt_current_processing(True)

        def on_step(step: int) -> None:
            # the last step's previews come after the LoRA is saved (_final_previews)
            if self.previewer is not None and step % self.preview_every == 0 and step != cfg.train.steps:
                self._render_previews(run, step)

        def save_step_lora(step: int) -> None:
            name = step_lora_name(self.lora_file, step)
            path = trainer.save_lora(self.loras_dir / name, output_name=Path(name).stem)
            if name not in self.step_files:
                self.step_files.append(name)
            log.info("APT: saved the LoRA of step %d to %s", step, path)

        with _elapsed_status(run, f"loading the model onto {backbone.device}"):  # attach_lora loads it
            trainer = AptTrainer(backbone, cached, cfg, checkpoint_dir=self.checkpoint_dir, on_event=on_event,
                                 should_stop=lambda: self._should_stop(run),
                                 encode_pixels=pixel_encoder(self.vae, patcher.model) if pixel_aug else None,
                                 on_checkpoint_step=save_step_lora if self.save_step_loras else None,
                                 on_step=on_step,
                                 data_fingerprint=self.data_fingerprint)
        try:
            resumed = trainer.resume(self.resume_from) if self.resume_from else 0
            if resumed:
                pbar.update_absolute(resumed, cfg.train.steps)
            RUNS.update(run, status="stopping" if run.stop_requested else "training", resumed_from=resumed,
                        step=resumed, history=list(trainer.history),
                        message=f"resumed at step {resumed}" if resumed else "training")
            RUNS.set_stop_callback(run, trainer.request_stop)
            send("apt.status", run.summary())
            if self.previewer is not None:
                self.previewer.bind(patcher, backbone.also_load, resumed)
                if resumed:  # the previews of the run this one continues
                    RUNS.update(run, previews=[self._viewable(p.to_dict()) for p in self.previewer.images])
                    send("apt.status", run.summary())
                else:  # the LoRA starts as a no-op: step 0 shows the base model
                    self._render_previews(run, 0)
            log.info("APT: training %s for %d steps%s on %s", self.lora_file, cfg.train.steps,
                     f" (resumed at {resumed})" if resumed else "", trainer.device)
            mid_step = False
            try:
                with _in_training():
                    result = trainer.run(final_checkpoint=False)  # the LoRA is saved first, below
                stopped, ckpt = result.stopped, result.checkpoint
            except mm.InterruptProcessingException:
                # Cancel landed inside a step: nothing of that step was applied; keep the state before it.
                self._cancel_seen, stopped, mid_step = True, True, True
                ckpt = trainer.save_last_good()  # the state before that step; resume replays it
            except Exception as exc:
                if _is_oom(exc):
                    # Keep what was trained: the state before the failing step (resume replays it).
                    self._oom_checkpoint = _save_quietly(trainer)
                    self._oom_step = trainer.step_idx
                raise
            steps_text = _step_files_text(self.step_files, cfg.train.checkpoint_every)
            if self.save_step_loras and not cfg.train.checkpoint_every:
                steps_text = "; no step LoRAs saved: 'checkpoint_every' is 0"
            if self._cancel_seen and not mid_step:
                ckpt = trainer.save_checkpoint()
            ckpt_str = str(ckpt) if ckpt else None
            if self._cancel_seen:
                RUNS.update(run, status="cancelled", checkpoint=ckpt_str,
                            message=f"cancelled at step {trainer.step_idx}; resumable checkpoint: {ckpt_str}"
                                    + steps_text)
                send("apt.status", run.summary())
                log.info("APT: %s cancelled at step %d, checkpoint %s", self.lora_file, trainer.step_idx, ckpt_str)
                raise mm.InterruptProcessingException()
            if trainer.step_idx == 0:
                raise AptError("Training was stopped before the first step; nothing to save.")
            path, ckpt_str, ckpt_note = self._save_lora_then_checkpoint(run, trainer, steps_text)
            self._final_previews(run, trainer.step_idx)
            status = "stopped" if stopped else "finished"
            previews = f"; previews took {_duration(self.previewer.seconds)}" if self.previewer else ""
            RUNS.update(run, status=status, checkpoint=ckpt_str,
                        message=f"{status} at step {trainer.step_idx}; saved {self.lora_file}" + steps_text + ckpt_note
                        + previews)
            send("apt.status", run.summary())
            log.info("APT: saved %s (%d steps) to %s%s", self.lora_file, trainer.step_idx, path, steps_text)
            return JobResult(self.lora_file, Path(path), trainer.step_idx, cfg.train.steps, resumed, stopped,
                             False, ckpt_str, trainer.indicator.gammas(), list(trainer.history),
                             list(self.step_files), self.previewer.seconds if self.previewer else 0.0)
        finally:
            RUNS.set_stop_callback(run, None)
            trainer.close()
            del trainer


