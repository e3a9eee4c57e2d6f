"""A plain DDIM sampler with classifier-free guidance on the diffusers UNet, deterministic per seed.

Each image's starting noise comes from its own `torch.Generator(seed)`, so an image depends only
on (model, prompt, seed), never on the batch it was drawn in. DDIM with eta = 0 on SDXL's training
schedule (scaled_linear 0.00085..0.012), "trailing" timestep spacing so the first step starts at
t = 999 from pure noise. The unconditional branch is the empty prompt (the prior was trained with
10% empty captions).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler

from apt_core.conditioning import SDXLConditioning
from apt_core.models import SDXLComponents

from .models import IMAGE_SIZE, conditioning


def ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=0, timestep_spacing="trailing", prediction_type=prediction_type)


def initial_noise(seeds: Sequence[int], latent_size: int) -> torch.Tensor:
    return torch.stack([torch.randn(4, latent_size, latent_size, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def decode(components: SDXLComponents, latents: torch.Tensor) -> np.ndarray:
    """(B, 4, h, w) scaled latents -> (B, 8h, 8w, 3) uint8."""
    vae = components.vae
    x = vae.decode(latents.to(vae.device, torch.float32) / vae.config.scaling_factor).sample
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(components: SDXLComponents, prompts: Sequence[str], seeds: Sequence[int], *,
           steps: int = 25, guidance: float = 5.0, size: int = IMAGE_SIZE, batch: int = 32,
           return_latents: bool = False) -> np.ndarray | tuple[np.ndarray, torch.Tensor]:
    """Images (N, size, size, 3) uint8 for prompts[i] with seeds[i]."""
    assert len(prompts) == len(seeds)
    unet = components.unet
    dev, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    sched = ddim_scheduler(components.scheduler.config.prediction_type)
    sched.set_timesteps(steps)
    uncond = conditioning(components, [""], size).to(dev, dtype)
    images, all_latents = [], []
    for lo in range(0, len(prompts), batch):
        ps, ss = list(prompts[lo:lo + batch]), list(seeds[lo:lo + batch])
        b = len(ps)
        cond = conditioning(components, ps, size).to(dev, dtype)
        both = SDXLConditioning.cat([SDXLConditioning(uncond.context.expand(b, -1, -1), uncond.pooled.expand(b, -1),
                                                      uncond.time_ids.expand(b, -1), uncond.token_mask.expand(b, -1)),
                                     cond])
        x = initial_noise(ss, size // 8).to(dev) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = torch.cat([x, x]).to(dtype)
            out = unet(inp, t.to(dev).expand(2 * b), encoder_hidden_states=both.context,
                       added_cond_kwargs={"text_embeds": both.pooled, "time_ids": both.time_ids},
                       return_dict=False)[0].float()
            u, c = out.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
        all_latents.append(x.cpu())
        images.append(decode(components, x))
    imgs = np.concatenate(images)
    return (imgs, torch.cat(all_latents)) if return_latents else imgs
