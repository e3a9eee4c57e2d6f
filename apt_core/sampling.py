"""Text-to-image sampling for any SDXLComponents: DDIM with classifier-free guidance.

Used to look at a LoRA before and after training (LoRA off vs on, same seeds). Deterministic per
image: each image's starting noise comes from its own `torch.Generator(seed)` and DDIM with
eta = 0 adds no further noise, so an image depends only on (model, prompt, seed, settings), never
on the batch it was drawn in (up to float rounding of batched matmuls). The schedule is the
model's training schedule (`components.scheduler`) with "trailing" timestep spacing, so the first
step starts at t = T - 1 from pure noise. The unconditional branch is the empty prompt.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler

from .conditioning import SDXLConditioning
from .models import SDXLComponents, encode_prompts


def ddim_scheduler(components: SDXLComponents | None = None,
                   prediction_type: str | None = None) -> DDIMScheduler:
    """DDIM (eta 0, trailing spacing) on the model's training schedule.

    Without components: SDXL's schedule (scaled_linear 0.00085..0.012, 1000 steps).
    """
    base = components.scheduler.config if components is not None else {}
    pred = prediction_type or base.get("prediction_type") or "epsilon"
    return DDIMScheduler(num_train_timesteps=base.get("num_train_timesteps", 1000),
                         beta_start=base.get("beta_start", 0.00085), beta_end=base.get("beta_end", 0.012),
                         beta_schedule=base.get("beta_schedule", "scaled_linear"),
                         rescale_betas_zero_snr=bool(base.get("rescale_betas_zero_snr", False)),
                         clip_sample=False, set_alpha_to_one=False, steps_offset=0,
                         timestep_spacing="trailing", prediction_type=pred)


def latent_shape(components: SDXLComponents, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the latent for a height x width image (VAE downsampling 2^(levels - 1))."""
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} must be a multiple of {factor}")
    return components.unet.config.in_channels, height // factor, width // factor


def initial_noise(seeds: Sequence[int], latent_size: int | tuple[int, int], channels: int = 4
                  ) -> torch.Tensor:
    """(N, channels, h, w) float32 standard normal noise on the CPU, one generator per seed.

    latent_size: h = w, or (h, w).
    """
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    return torch.stack([torch.randn(channels, h, w, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def prompt_conditioning(components: SDXLComponents, prompts: Sequence[str], height: int,
                        width: int) -> SDXLConditioning:
    """SDXL conditioning (B = len(prompts)) at height x width, uncropped (as training caches it)."""
    return encode_prompts(components, list(prompts), (height, width), (0, 0), (height, width))


def expand(cond: SDXLConditioning, n: int) -> SDXLConditioning:
    """A batch-1 conditioning repeated to batch n (views, no copy)."""
    return SDXLConditioning(cond.context.expand(n, -1, -1), cond.pooled.expand(n, -1),
                            cond.time_ids.expand(n, -1), cond.token_mask.expand(n, -1))


def unet_output(components: SDXLComponents, x: torch.Tensor, t: torch.Tensor,
                cond: SDXLConditioning) -> torch.Tensor:
    """The UNet's raw output (B, C, h, w) in float32 for latents x (B, C, h, w) at timestep t."""
    unet = components.unet
    p = next(unet.parameters())
    cond = cond.to(p.device, p.dtype)
    return unet(x.to(p.device, p.dtype), t.to(p.device).expand(x.shape[0]),
                encoder_hidden_states=cond.context,
                added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids},
                return_dict=False)[0].float()


def guided_output(components: SDXLComponents, x: torch.Tensor, t: torch.Tensor,
                  cond: SDXLConditioning, uncond: SDXLConditioning, guidance: float) -> torch.Tensor:
    """Classifier-free guidance u + guidance (c - u) of the UNet outputs, (B, C, h, w) float32.

    Both branches run as one batch (uncond first). guidance == 1 is exactly the conditional
    output and skips the unconditional branch.
    """
    if guidance == 1.0:
        return unet_output(components, x, t, cond)
    both = SDXLConditioning.cat([uncond.to(cond.context.device), cond])
    u, c = unet_output(components, torch.cat([x, x]), t, both).chunk(2)
    return u + guidance * (c - u)


def to_uint8_images(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 images (clamped, rounded)."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode(components: SDXLComponents, latents: torch.Tensor) -> np.ndarray:
    """(B, 4, h, w) scaled latents -> (B, 8h, 8w, 3) uint8 images (VAE in float32)."""
    vae = components.vae
    z = latents.to(vae.device, torch.float32) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    return to_uint8_images(vae.decode(z.to(vae.dtype)).sample)


@torch.no_grad()
def denoise(components: SDXLComponents, noise: torch.Tensor, cond: SDXLConditioning,
            uncond: SDXLConditioning, *, steps: int = 25, guidance: float = 5.0) -> torch.Tensor:
    """Run DDIM from `noise` (B, C, h, w) to clean latents (B, C, h, w) float32 on the UNet's device.

    cond: batch B; uncond: batch B (or 1, expanded).
    """
    sched = ddim_scheduler(components)
    sched.set_timesteps(steps)
    dev = next(components.unet.parameters()).device
    b = noise.shape[0]
    uncond = expand(uncond, b) if uncond.context.shape[0] == 1 and b > 1 else uncond
    x = noise.to(dev, torch.float32) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = guided_output(components, x, t, cond, uncond, guidance)
        x = sched.step(out, t, x).prev_sample
    return x


@contextmanager
def on_device(components: SDXLComponents, device: torch.device | str) -> Iterator[None]:
    """Move the UNet, VAE and text encoders to `device` for the duration, then back."""
    modules = [components.unet, components.vae, components.text_encoder_1, components.text_encoder_2]
    before = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, dev in zip(modules, before):
            m.to(dev)


@torch.no_grad()
def sample(components: SDXLComponents, prompts: Sequence[str], seeds: Sequence[int], *,
           steps: int = 25, guidance: float = 5.0, size: int | tuple[int, int] = 64, batch: int = 32,
           negative_prompt: str = "", return_latents: bool = False
           ) -> np.ndarray | tuple[np.ndarray, torch.Tensor]:
    """Images (N, H, W, 3) uint8 for prompts[i] drawn with seeds[i] (N = len(prompts)).

    size: H = W, or (H, W) in pixels. With return_latents also the (N, C, h, w) latents (CPU).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    height, width = (size, size) if isinstance(size, int) else size
    channels, h, w = latent_shape(components, height, width)
    dev = next(components.unet.parameters()).device
    uncond = prompt_conditioning(components, [negative_prompt], height, width).to(dev)
    images, all_latents = [], []
    for lo in range(0, len(prompts), batch):
        ps, ss = list(prompts[lo:lo + batch]), list(seeds[lo:lo + batch])
        cond = prompt_conditioning(components, ps, height, width).to(dev)
        x = denoise(components, initial_noise(ss, (h, w), channels), cond, uncond,
                    steps=steps, guidance=guidance)
        all_latents.append(x.cpu())
        images.append(decode(components, x))
    imgs = np.concatenate(images) if images else np.zeros((0, height, width, 3), np.uint8)
    return (imgs, torch.cat(all_latents)) if return_latents else imgs


# ----------------------------------------------------------------------------- before/after grid

def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of text to lines at most `width` pixels wide."""
    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def before_after_grid(prompts: Sequence[str], before: np.ndarray, after: np.ndarray, *,
                      title: str = "", labels: tuple[str, str] = ("before (LoRA off)", "after (LoRA on)"),
                      references: Sequence[np.ndarray] = (), cell: int = 128, text_width: int = 300):
    """A labelled PIL image: one row per prompt, its k `before` then its k `after` images.

    before, after: (len(prompts) * k, H, W, 3) uint8, prompt i's images at rows i*k .. i*k+k-1
    (the same seeds in both). references: optional (h, w, 3) uint8 training images shown in a
    first row (at most 2k). Small images are enlarged (nearest neighbour) to about `cell` px.
    """
    from PIL import Image, ImageDraw

    n = len(prompts)
    if n == 0 or before.shape != after.shape or before.shape[0] % n:
        raise ValueError(f"{n} prompts do not match images {before.shape} / {after.shape}")
    k, (h, w) = before.shape[0] // n, before.shape[1:3]
    scale = max(1, cell // max(h, w))
    ch, cw, gap, pad = h * scale, w * scale, 12, 4
    font, bold = _font(13), _font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows = [_wrap(probe, p if p else '(empty prompt)', font, text_width - 2 * pad) for p in prompts]
    line_h = 16
    head = (22 if title else 0) + 22
    refs = [Image.fromarray(r).resize((cw, ch), Image.Resampling.NEAREST) for r in list(references)[:2 * k]]
    ref_h = ch + 2 * pad if refs else 0
    row_h = [max(ch, len(r) * line_h + 2 * pad) + pad for r in rows]
    width = text_width + 2 * k * (cw + pad) + gap + pad
    canvas = Image.new("RGB", (width, head + ref_h + sum(row_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 3), title, fill=(0, 0, 0), font=bold)
    x_before, x_after = text_width, text_width + k * (cw + pad) + gap
    y = head - 22
    if refs:
        draw.text((pad, y + pad), "training images", fill=(40, 40, 40), font=bold)
        for j, im in enumerate(refs):
            canvas.paste(im, (x_before + j * (cw + pad) + (gap if j >= k else 0), y + pad))
        y += ref_h
    line_top = y
    for x, label in ((x_before, labels[0]), (x_after, labels[1])):
        draw.text((x, y + 3), label, fill=(0, 0, 0), font=bold)
    y += 22
    for i, lines in enumerate(rows):
        for j, line in enumerate(lines):
            draw.text((pad, y + pad + j * line_h), line, fill=(40, 40, 40), font=font)
        for j in range(k):
            for x0, imgs in ((x_before, before), (x_after, after)):
                im = Image.fromarray(imgs[i * k + j]).resize((cw, ch), Image.Resampling.NEAREST)
                canvas.paste(im, (x0 + j * (cw + pad), y))
        y += row_h[i]
    draw.line([(x_after - gap // 2 - pad // 2, line_top), (x_after - gap // 2 - pad // 2, y)],
              fill=(180, 180, 180), width=2)
    return canvas
