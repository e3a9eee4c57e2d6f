"""Sample previews while the LoRA trains: a few fixed prompts and seeds rendered by the host model
with the LoRA as trained so far, the host's way (comfy.sample with the training clone, whose weight
adapters carry the LoRA; the VAE decodes), saved as PNGs in the run folder.

A preview must not change the training: it runs under no_grad, draws its noise from its own seed
(ComfyUI's prepare_noise seeds the global generators, so they are forked), loads the VAE beside the
model being trained and decodes without asking ComfyUI to load anything else, and leaves the LoRA
switched on as it found it. Previews at step 0 show the base model (the LoRA starts as a no-op).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from apt_core.export import atomic_write

PREVIEW_DIR = "previews"
SAMPLER, SCHEDULER = "euler", "normal"  # deterministic given the noise
STEPS, CFG = 12, 5.0  # few steps: a preview, not a final render
NEGATIVE = "blurry, low quality, deformed"
# Prompts that put the subject somewhere its photos never showed it.
NEW_CONTEXTS = ("a photo of {subject} on a beach at sunset", "a watercolor painting of {subject}")


def preview_prompts(captions: Sequence[str], subject: str, extra: str = "") -> list[str]:
    """The prompts to preview: the artist's own (one per line) if given, else the first training
    caption and, when the subject's words are known ('sks dog'), two new contexts for it."""
    own = [ln.strip() for ln in (extra or "").splitlines() if ln.strip()]
    if own:
        return own
    prompts = [captions[0]] if captions else []
    if subject.strip():
        prompts += [p.format(subject=subject.strip()) for p in NEW_CONTEXTS]
    return prompts


@dataclass
class PreviewImage:
    step: int
    prompt: str
    seed: int
    file: str  # relative to the run folder: previews/step_000100_0.png
    lora_file: str | None = None  # the step LoRA saved at this step, if any

    def to_dict(self) -> dict:
        return {"step": self.step, "prompt": self.prompt, "seed": self.seed, "file": self.file,
                "lora_file": self.lora_file}


@dataclass
class Previewer:
    """Renders `prompts` (one seed each: seed + i) at `size` px with the training patcher."""

    patcher: object  # the training clone (ModelPatcher) with the LoRA adapters
    vae: object
    clip: object
    prompts: list[str]
    run_dir: Path
    size: tuple[int, int]  # (height, width) in pixels
    seed: int = 0
    steps: int = STEPS
    cfg: float = CFG
    images: list[PreviewImage] = field(default_factory=list)
    seconds: float = 0.0  # time spent rendering by this run
    renders: int = 0  # preview steps rendered by this run
    also_load: tuple = ()
    _conds: list | None = None

    def bind(self, patcher, also_load: tuple, resumed_at: int) -> None:
        """Render with `patcher` (loaded with `also_load`); keep the previews of an earlier run of this
        LoRA up to the step it resumes at."""
        self.patcher, self.also_load = patcher, tuple(also_load)
        self.images = [PreviewImage(**p) for p in read_index(self.run_dir)["images"] if p["step"] <= resumed_at] \
            if resumed_at else []

    def encode(self) -> None:
        """Encode the prompts once (before training: the text encoders are not needed again)."""
        def cond(text: str):
            return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

        self._conds = [cond(p) for p in self.prompts] + [cond(NEGATIVE)]

    def render(self, step: int, lora_file: str | None = None,
               should_stop: Callable[[], bool] = lambda: False) -> list[PreviewImage]:
        """Render every prompt now and save the PNGs; returns this step's images. should_stop: checked
        before each prompt (the node's Stop: the prompts not rendered yet are skipped)."""
        import comfy.model_management as mm
        import comfy.sample

        if self._conds is None:
            self.encode()
        started = time.perf_counter()
        h, w = self.size
        out = []
        folder = self.run_dir / PREVIEW_DIR
        folder.mkdir(parents=True, exist_ok=True)
        # The VAE loads beside the model being trained, never in its place; then it decodes through its
        # network directly: VAE.decode would ask ComfyUI to load it again, which may push the training
        # model (and the LoRA's weight functions) off the GPU (the same care as nodes/encoding.pixel_encoder).
        mm.load_models_gpu([self.patcher, *self.also_load, self.vae.patcher], memory_required=1e20,
                           force_full_load=True)
        device = torch.device(self.patcher.load_device)
        # ComfyUI's prepare_noise seeds torch's global generators (CPU and CUDA): fork them
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                for i, (prompt, positive) in enumerate(zip(self.prompts, self._conds)):
                    mm.throw_exception_if_processing_interrupted()
                    if should_stop():
                        break
                    seed = self.seed + i
                    latent = torch.zeros(1, 4, h // 8, w // 8)
                    noise = comfy.sample.prepare_noise(latent, seed)
                    samples = comfy.sample.sample(self.patcher, noise, self.steps, self.cfg, SAMPLER, SCHEDULER,
                                                  positive, self._conds[-1], latent, disable_pbar=True, seed=seed)
                    img = to_png_array(self._decode(samples))
                    rel = f"{PREVIEW_DIR}/step_{step:06d}_{i}.png"
                    save_png(self.run_dir / rel, img)
                    out.append(PreviewImage(step, prompt, seed, rel, lora_file))
        finally:
            if self.vae.patcher not in self.also_load:
                from .comfy_backbone import release_patcher

                release_patcher(self.vae.patcher)
        self.images += out
        self.seconds += time.perf_counter() - started
        self.renders += 1
        self.write_index()
        return out

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(1, 4, h, w) latent -> (1, H, W, 3) in [0, 1], as VAE.decode gives it, without loading anything."""
        vae = self.vae
        x = vae.first_stage_model.decode(latent.to(vae.vae_dtype).to(vae.device))
        return vae.process_output(x.float()).movedim(1, -1).cpu()

    def write_index(self) -> None:
        """previews/index.json: every preview so far, so the run route and a reloaded page list them."""
        data = json.dumps({"images": [p.to_dict() for p in self.images], "seconds": round(self.seconds, 3)},
                          indent=1).encode()
        atomic_write(self.run_dir / PREVIEW_DIR / "index.json", lambda tmp: Path(tmp).write_bytes(data))


def to_png_array(pixels: torch.Tensor) -> np.ndarray:
    """VAE output (1, H, W, 3) or (1, 1, H, W, 3) in [0, 1] -> (H, W, 3) uint8."""
    x = pixels.reshape(-1, *pixels.shape[-3:])[0].float().clamp(0, 1)
    return (x.cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def save_png(path: Path, img: np.ndarray) -> None:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    data = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def read_index(run_dir: Path) -> dict:
    """The previews a run folder holds ({"images": [], "seconds": 0} without any)."""
    try:
        return json.loads((run_dir / PREVIEW_DIR / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"images": [], "seconds": 0.0}
