"""Class images for prior preservation (an addition to APT, DreamBooth's, off by default).

DreamBooth keeps a class ("a dog") from turning into the subject by training, next to the
references, on images the pretrained model draws for the class prompt. Here those images are drawn
once before training by the prior itself (no LoRA exists yet), from each caption without the trigger
word, and kept as latents: output preservation (`RegularizerConfig.lambda_preserve`) then pulls the
LoRA's prediction on them towards the prior's, instead of on the references' own noisy latents.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .conditioning import CachedExample, SDXLConditioning, preservation_caption
from .models import SDXLComponents
from .sampling import denoise, initial_noise, latent_shape, prompt_conditioning


def class_prompts(captions: Sequence[str], trigger_words: Sequence[str]) -> list[str]:
    """The unique captions without the trigger words, in order of first appearance."""
    return list(dict.fromkeys(preservation_caption(c, trigger_words) for c in captions))


@torch.no_grad()
def sample_class_examples(components: SDXLComponents, captions: Sequence[str], trigger_words: Sequence[str],
                          count: int, *, size: int | tuple[int, int], seed: int = 100_000, steps: int = 25,
                          guidance: float = 5.0, batch: int = 8, store_device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> list[CachedExample]:
    """`count` images drawn by the model as it is (call before a LoRA is attached) from the class prompts,
    cycling through them, as cached examples: latent (4, h, w), conditioning of their prompt (batch 1).

    size: H = W, or (H, W) in pixels. Image i starts from the noise of seed `seed + i` and is drawn
    as `apt_core.sampling.sample` draws it (DDIM, CFG against the empty prompt), so the set is the
    same for every training seed. The UNet and text encoders run where they are.
    """
    if count < 1:
        return []
    prompts = class_prompts(captions, trigger_words)
    chosen = [prompts[i % len(prompts)] for i in range(count)]
    height, width = (size, size) if isinstance(size, int) else size
    channels, h, w = latent_shape(components, height, width)
    dev = next(components.unet.parameters()).device
    conds = {p: prompt_conditioning(components, [p], height, width) for p in prompts}
    uncond = prompt_conditioning(components, [""], height, width).to(dev)
    latents = []
    for lo in range(0, count, batch):  # no VAE decode: training needs only the latents
        part = chosen[lo:lo + batch]
        cond = SDXLConditioning.cat([conds[p] for p in part]).to(dev)
        noise = initial_noise([seed + lo + i for i in range(len(part))], (h, w), channels)
        latents.append(denoise(components, noise, cond, uncond, steps=steps, guidance=guidance).cpu())
    return [CachedExample(latent.to(store_device, dtype), conds[p].to(store_device, dtype), p,
                          source=f"class image {i}")
            for i, (latent, p) in enumerate(zip(torch.cat(latents), chosen))]


def draw_class_batch(pool: Sequence[CachedExample], batch_size: int, num_train_timesteps: int,
                     generator: torch.Generator
                     ) -> tuple[torch.Tensor, SDXLConditioning, torch.Tensor, torch.Tensor]:
    """`batch_size` class images drawn with replacement, each with its own timestep and noise.

    Returns latents (B, 4, h, w), their conditioning (batch B), t (B,) and noise (B, 4, h, w), on the
    CPU (latents and conditioning where the pool keeps them).
    """
    chosen = [pool[i] for i in torch.randint(len(pool), (batch_size,), generator=generator).tolist()]
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    latents = torch.stack([ex.latent for ex in chosen])
    noise = torch.randn(latents.shape, generator=generator)
    return latents, SDXLConditioning.cat([ex.cond for ex in chosen]), t, noise
