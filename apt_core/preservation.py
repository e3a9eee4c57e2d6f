"""Class images for prior preservation (an addition to APT, DreamBooth's, off by default).

DreamBooth keeps a class ("a dog") from turning into the subject by training, next to the
references, on images the pretrained model draws for the class prompt. Here those images are drawn
once before training by the prior itself (no LoRA exists yet), from each caption without the trigger
word, and kept as latents: output preservation (`RegularizerConfig.lambda_preserve`) then pulls the
LoRA's prediction on them towards the prior's, instead of on the references' own noisy latents.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import DDIMScheduler
from safetensors import safe_open
from safetensors.torch import save_file

from .backbone import Backbone, DiffusersSDXLBackbone
from .conditioning import CachedExample, SDXLConditioning, preservation_caption
from .errors import AptOutputError
from .export import atomic_write
from .models import SDXLComponents
from .sampling import expand, initial_noise, latent_shape, prompt_conditioning


# Image i of a class set starts from the noise of seed CLASS_SEED + i, in every host and run.
CLASS_SEED = 100_000
# How class images are drawn unless a caller says otherwise (DDIM steps, classifier-free guidance).
CLASS_DRAW_STEPS, CLASS_DRAW_GUIDANCE = 25, 5.0
# Drawn class latents are kept next to a run's checkpoints under this name, so that a resumed run
# (or a new one on the same model and captions) does not draw them again.
CLASS_CACHE_NAME = "class_images.safetensors"


def class_prompts(captions: Sequence[str], trigger_words: Sequence[str]) -> list[str]:
    """The unique captions without the trigger words, in order of first appearance."""
    return list(dict.fromkeys(preservation_caption(c, trigger_words) for c in captions))


def cycled_class_prompts(captions: Sequence[str], trigger_words: Sequence[str], count: int) -> list[str]:
    """The prompt of each of `count` class images: the class prompts, cycled."""
    prompts = class_prompts(captions, trigger_words)
    return [prompts[i % len(prompts)] for i in range(count)]


def class_examples(latents: torch.Tensor, conds: Sequence[SDXLConditioning], prompts: Sequence[str],
                   store_device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> list[CachedExample]:
    """Drawn class latents (N, 4, h, w) with their conditionings and prompts as cached examples."""
    return [CachedExample(z.to(store_device, dtype), c.to(store_device, dtype), p, source=f"class image {i}")
            for i, (z, c, p) in enumerate(zip(latents, conds, prompts))]


def ddim_for(backbone: Backbone) -> DDIMScheduler:
    """DDIM (eta 0, trailing spacing) on the backbone's own training schedule (`alphas_cumprod`)."""
    acp = backbone.alphas_cumprod.detach().double().cpu()
    betas = 1.0 - acp / torch.cat([acp.new_ones(1), acp[:-1]])
    return DDIMScheduler(num_train_timesteps=len(acp), trained_betas=betas.numpy(), clip_sample=False,
                         set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing",
                         prediction_type=backbone.prediction_type)


@torch.no_grad()
def draw_class_latents(backbone: Backbone, conds: Sequence[SDXLConditioning], uncond: SDXLConditioning,
                       seeds: Sequence[int], latent_hw: tuple[int, int], *, steps: int = CLASS_DRAW_STEPS,
                       guidance: float = CLASS_DRAW_GUIDANCE, batch: int = 2,
                       check_interrupt: Callable[[], None] = lambda: None,
                       progress: Callable[[float, int], None] = lambda done, total: None) -> torch.Tensor:
    """Clean latents (N, 4, h, w) float32 on the CPU that the backbone's UNet, as it is, draws for
    conds[i] (batch 1 each) from the noise of seeds[i] (one generator each): DDIM with classifier-free
    guidance against `uncond` (batch 1), both branches in one batch. Works for any Backbone (the
    diffusers one here, ComfyUI's in the node pack). batch: images per UNet call (x 2 for CFG); 2
    keeps SDXL at 1024 px within the memory of training. progress(done, total): after each UNet call,
    in images (each of the `steps` calls counts its batch's share)."""
    sched = ddim_for(backbone)
    sched.set_timesteps(steps)
    device, dtype = backbone.device, backbone.dtype
    out = []
    for lo in range(0, len(seeds), batch):
        part = list(seeds[lo:lo + batch])
        b = len(part)
        both = SDXLConditioning.cat([expand(uncond, b), *conds[lo:lo + b]]).to(device, dtype)
        x = initial_noise(part, latent_hw).to(device) * sched.init_noise_sigma
        for k, t in enumerate(sched.timesteps):
            check_interrupt()
            tt = torch.full((2 * b,), int(t), device=device)
            u, v = backbone.predict(torch.cat([x, x]).to(dtype), tt, both).float().chunk(2)
            x = sched.step(u + guidance * (v - u), t, x).prev_sample
            progress(lo + b * (k + 1) / len(sched.timesteps), len(seeds))
        out.append(x.cpu())
    return torch.cat(out)


def unet_fingerprint(unet: torch.nn.Module, values: int = 256) -> str:
    """A short hash of the UNet's weights as they are now (another checkpoint, or a LoRA merged into
    them, changes it): the first `values` entries of every parameter tensor, in float32."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            digest.update(name.encode())
            digest.update(p.detach().flatten()[:values].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def class_draw_key(prompts: Sequence[str], seeds: Sequence[int], latent_hw: tuple[int, int], steps: int,
                   guidance: float, model: str) -> str:
    """Everything a drawn class set depends on, as one string (`model`: `unet_fingerprint`)."""
    return json.dumps({"prompts": list(prompts), "seeds": list(seeds), "latent_hw": list(latent_hw),
                       "steps": steps, "guidance": guidance, "model": model}, sort_keys=True)


def cached_class_latents(path: str | Path | None, key: str, draw: Callable[[], torch.Tensor]
                         ) -> tuple[torch.Tensor, bool]:
    """The class latents saved at `path` for `key`, or `draw()`'s, then saved there (atomically).

    Returns (latents (N, 4, h, w), whether they were read from `path`). A file for another key, or an
    unreadable one, is drawn again and replaced; a file that cannot be written (full disk) only
    costs the next run the draw.
    """
    if path is not None and Path(path).is_file():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("apt_class_key") == key:
                    return f.get_tensor("latents"), True
        except Exception:  # noqa: BLE001 - a damaged cache is drawn again
            pass
    latents = draw()
    if path is not None:
        try:
            atomic_write(path, lambda tmp: save_file({"latents": latents.contiguous()}, tmp,
                                                     metadata={"apt_class_key": key}))
        except AptOutputError:
            pass
    return latents, False


def sample_class_examples(components: SDXLComponents, captions: Sequence[str], trigger_words: Sequence[str],
                          count: int, *, size: int | tuple[int, int], seed: int = CLASS_SEED,
                          steps: int = CLASS_DRAW_STEPS, guidance: float = CLASS_DRAW_GUIDANCE, batch: int = 2,
                          store_device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                          ) -> list[CachedExample]:
    """`count` images drawn by the diffusers model as it is (call before a LoRA is attached) from the
    class prompts, cycling through them, as cached examples: latent (4, h, w), conditioning of their
    prompt (batch 1).

    size: H = W, or (H, W) in pixels. Image i starts from the noise of seed `seed + i` (as
    `apt_core.sampling.sample` would draw it), so the set is the same for every training seed.
    The UNet and text encoders run where they are.
    """
    return load_or_sample_class_examples(components, captions, trigger_words, count, size=size, seed=seed,
                                         steps=steps, guidance=guidance, batch=batch, store_device=store_device,
                                         dtype=dtype, cache=None)[0]


def load_or_sample_class_examples(components: SDXLComponents, captions: Sequence[str],
                                  trigger_words: Sequence[str], count: int, *, size: int | tuple[int, int],
                                  cache: str | Path | None, seed: int = CLASS_SEED, steps: int = CLASS_DRAW_STEPS,
                                  guidance: float = CLASS_DRAW_GUIDANCE, batch: int = 2,
                                  store_device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                                  ) -> tuple[list[CachedExample], bool]:
    """`sample_class_examples`, reusing the set kept in the file `cache` when it was drawn by the
    same weights, prompts, seeds, size, steps and guidance, and keeping a new one there otherwise.
    Returns (examples, whether they were reused)."""
    if count < 1:
        return [], False
    chosen = cycled_class_prompts(captions, trigger_words, count)
    height, width = (size, size) if isinstance(size, int) else size
    _, h, w = latent_shape(components, height, width)
    conds = {p: prompt_conditioning(components, [p], height, width) for p in dict.fromkeys(chosen)}
    uncond = prompt_conditioning(components, [""], height, width)
    chosen_conds = [conds[p] for p in chosen]
    latents, reused = load_or_draw_class_latents(
        DiffusersSDXLBackbone.from_components(components), chosen, chosen_conds, uncond, (h, w), cache,
        seed=seed, steps=steps, guidance=guidance, batch=batch)
    return class_examples(latents, chosen_conds, chosen, store_device, dtype), reused


def load_or_draw_class_latents(backbone: Backbone, prompts: Sequence[str], conds: Sequence[SDXLConditioning],
                               uncond: SDXLConditioning, latent_hw: tuple[int, int], cache: str | Path | None,
                               *, seed: int = CLASS_SEED, steps: int = CLASS_DRAW_STEPS,
                               guidance: float = CLASS_DRAW_GUIDANCE, batch: int = 2,
                               check_interrupt: Callable[[], None] = lambda: None,
                               on_draw: Callable[[], None] = lambda: None,
                               progress: Callable[[float, int], None] = lambda done, total: None
                               ) -> tuple[torch.Tensor, bool]:
    """`draw_class_latents` for prompts[i] / conds[i] from the noise of seed + i, or the set kept in
    the file `cache` for the same backbone weights (`unet_fingerprint`), prompts, seeds, size, steps
    and guidance (`cached_class_latents`; None: always draw, keep nothing). on_draw: called just
    before drawing (not when the set is reused); progress: `draw_class_latents`'. Returns (latents
    (N, 4, h, w), whether reused)."""
    seeds = [seed + i for i in range(len(prompts))]
    key = class_draw_key(prompts, seeds, latent_hw, steps, guidance, unet_fingerprint(backbone.unet)) \
        if cache is not None else ""

    def draw() -> torch.Tensor:
        on_draw()
        return draw_class_latents(backbone, conds, uncond, seeds, latent_hw, steps=steps, guidance=guidance,
                                  batch=batch, check_interrupt=check_interrupt, progress=progress)

    return cached_class_latents(cache, key, draw)
