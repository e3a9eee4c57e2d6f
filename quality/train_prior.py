"""Train the benchmark's pretrained prior on the world, deterministically, and save it (fp16).

    python -m quality.train_prior --out quality/assets/prior [--device cpu|cuda|auto] [--quick]
    python -m quality.train_prior --out quality/assets/prior128 --size 128 --vae-from quality/assets/prior
    python -m quality.train_prior --out quality/assets/prior128c --size 128 --init-from quality/assets/prior128b \
        --noise-offset 0.1 --unet-steps 1500 --unet-lr 3e-4 --threads 2

1. VAE: a tiny AutoencoderKL (see quality.models.vae_config) on world images (32 px crops, then
   full 64 px images) with every shape and colour (a general-purpose VAE, as SDXL's is), trained as a plain autoencoder on the
   posterior mean (which encode_pixels uses): L1 + MSE, latent noise 0.1, small L2 on latents.
   Its scaling_factor is set to 1 / std of the dataset latents afterwards.
2. UNet + both text encoders, jointly, on pretraining scenes only (PRETRAIN_SHAPES / COLOURS;
   1 in 10 attribute combinations held out for evaluation), epsilon prediction on SDXL's noise
   schedule (optionally with offset noise, --noise-offset), min-SNR-5 loss weights, captions with
   each attribute dropped with p = 0.25 and 10% empty captions (for classifier-free guidance).
   Tokens never seen in training (the concept token "sks", novel shapes and colours) keep their
   random initial embeddings (no weight decay there).
3. Save as a diffusers SDXL folder (fp16), reload with apt_core.models.load_sdxl and measure
   prompt following on held-out prompts, and how much of the background comes from the starting
   noise instead of the prompt (written to prompt_following.json and printed).
Everything is seeded; on CPU the result is bit-for-bit repeatable for the same thread count
(--threads, default 1: on a shared 2-core machine one thread is faster than two fighting ones).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from apt_core.models import load_sdxl
from quality.tiny_model import save_tiny_sdxl

from .models import IMAGE_SIZE, build_world_sdxl, encode_text_grad, token_ids, world_image_size
from .sampling import initial_noise, sample
from .world import (COLOURS, PRETRAIN_COLOURS, PRETRAIN_SHAPES, SHAPES, border_rgb, caption, detect,
                    is_held_out, random_scene, render, training_caption)

FULL = dict(vae_steps=2500, vae_batch=32, vae_crop=32, vae_full_steps=300, vae_lr=2e-3,
            n_train=8000, unet_steps=1600, unet_batch=32, unet_lr=1e-3, noise_offset=0.0, eval_prompts=96)
QUICK = dict(vae_steps=20, vae_batch=8, vae_crop=32, vae_full_steps=5, vae_lr=2e-3, n_train=64,
             unet_steps=10, unet_batch=8, unet_lr=1e-3, noise_offset=0.0, eval_prompts=4)


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def train_vae(vae, steps: int, batch: int, lr: float, seed: int, device: str, t0: float,
              crop: int = IMAGE_SIZE, reg_weight: float = 1e-3, latent_noise: float = 0.1,
              size: int = IMAGE_SIZE) -> None:
    """Deterministic autoencoder training on the posterior mean (what encode_pixels uses) with
    a little latent noise (a smooth decoder) and an L2 penalty on the latents (bounded scale)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vae.train().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        imgs = []
        for _ in range(batch):
            img = render(random_scene(rng, shapes=SHAPES, colours=COLOURS), size)
            y, x = rng.randrange(0, size - crop + 1, 8), rng.randrange(0, size - crop + 1, 8)
            imgs.append(img[y:y + crop, x:x + crop])
        x = to_tensor(imgs).to(device)
        mean = vae.encode(x).latent_dist.mean
        noise = torch.randn(mean.shape, generator=gen).to(device)
        rec = vae.decode(mean + latent_noise * noise).sample
        reg = mean.pow(2).mean()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + reg_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f} latent mean-square {reg.item():.3f}", t0)
    vae.eval()


@torch.no_grad()
def encode_scenes(vae, scenes, device: str, batch: int = 64, size: int = IMAGE_SIZE) -> torch.Tensor:
    out = []
    for lo in range(0, len(scenes), batch):
        x = to_tensor([render(s, size) for s in scenes[lo:lo + batch]]).to(device)
        out.append(vae.encode(x).latent_dist.mean.cpu())
    return torch.cat(out)


def pretraining_scenes(n: int, seed: int):
    rng, scenes = random.Random(seed), []
    while len(scenes) < n:
        s = random_scene(rng, shapes=PRETRAIN_SHAPES, colours=PRETRAIN_COLOURS)
        if not is_held_out(s):
            scenes.append(s)
    return scenes


def held_out_scenes(n: int, seed: int):
    rng, scenes = random.Random(seed), []
    while len(scenes) < n:
        s = random_scene(rng, shapes=PRETRAIN_SHAPES, colours=PRETRAIN_COLOURS)
        if is_held_out(s):
            scenes.append(s)
    return scenes


def training_noise(shape: torch.Size | tuple[int, ...], noise_offset: float, generator: torch.Generator
                   ) -> torch.Tensor:
    """(B, C, h, w) standard normal noise plus noise_offset * a (B, C, 1, 1) standard normal
    ("offset noise"): each channel's spatial mean then has variance 1 / (h w) + noise_offset^2."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def train_unet(c, latents: torch.Tensor, scenes, steps: int, batch: int, lr: float, seed: int,
               device: str, t0: float, snr_gamma: float = 5.0, p_empty: float = 0.1,
               size: int = IMAGE_SIZE, noise_offset: float = 0.0) -> None:
    """noise_offset: std of a per-sample, per-channel constant added to the noise (SDXL was trained
    with 0.0357). SDXL's schedule leaves sqrt(alpha_bar_999) = 0.068 of the image in x_999, and a
    16 x 16 latent's per-channel noise mean is only 1/16 in std, so without it the UNet learns to
    read the image's mean colour (the background) from the noise instead of from the prompt."""
    rng = random.Random(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    unet, te1, te2 = c.unet.to(device).train(), c.text_encoder_1.to(device).train(), c.text_encoder_2.to(device).train()
    params = [{"params": list(unet.parameters()), "weight_decay": 1e-2},
              {"params": list(te1.parameters()) + list(te2.parameters()), "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, lr=lr)
    acp = c.scheduler.alphas_cumprod.float()
    snr = acp / (1 - acp)
    weights = (snr.clamp(max=snr_gamma) / snr)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    warmup = max(1, steps // 25)
    ema_loss = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, len(scenes), (batch,), generator=gen)
        caps = ["" if rng.random() < p_empty else training_caption(scenes[i], rng) for i in idx.tolist()]
        x0 = latents[idx]
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = training_noise(x0.shape, noise_offset, gen)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(device)
        ctx, pooled, _ = encode_text_grad(c, *token_ids(c, caps))
        pred = unet(x_t, t.to(device), encoder_hidden_states=ctx,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1).to(device)},
                    return_dict=False)[0]
        per = (pred.float() - noise.to(device)).pow(2).mean(dim=(1, 2, 3))
        loss = (weights[t].to(device) * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step + 1}/{steps} loss(ema) {ema_loss:.4f}", t0)
    for m in (unet, te1, te2):
        m.eval()


ATTRS = ("background", "position", "size_name", "shape", "colour", "style")


def prompt_following(components, scenes, seed: int = 1000, **sample_kw) -> dict:
    """Sample one image per held-out scene's full caption; accuracy of each detected attribute."""
    prompts = [caption(s) for s in scenes]
    images = sample(components, prompts, [seed + i for i in range(len(prompts))],
                    size=world_image_size(components), **sample_kw)
    dets = [detect(im) for im in images]
    res = {"n": len(scenes), "present": float(np.mean([d.present for d in dets]))}
    for a in ATTRS:
        res[a] = float(np.mean([getattr(d, a) == getattr(s, a) for d, s in zip(dets, scenes)]))
    return res


@torch.no_grad()
def vae_roundtrip(components, scenes) -> dict:
    """Detector accuracy on VAE reconstructions (encode_pixels -> decode) of rendered scenes:
    an upper bound for what any UNet on this latent space can show."""
    from apt_core.models import encode_pixels

    from .sampling import decode

    imgs = [render(s, world_image_size(components)) for s in scenes]
    rec = decode(components, encode_pixels(components, to_tensor(imgs)))
    dets = [detect(im) for im in rec]
    return {a: float(np.mean([getattr(d, a) == getattr(s, a) for d, s in zip(dets, scenes)])) for a in ATTRS}


def r_squared(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fraction of the variance of each column of y (n, d) explained by a least-squares fit on
    x (n, k) plus an intercept -> (d,). With k random regressors it is about k / (n - 1) by chance."""
    design = np.c_[x, np.ones(len(x))]
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return 1.0 - (y - design @ coef).var(0) / y.var(0)


def background_from_noise(components, backgrounds=("white", "sand", "pink"), n: int = 32,
                          seed: int = 2000) -> dict:
    """How much of the background colour comes from the starting noise instead of the prompt.

    For each background, n images of the same prompt with n seeds; the R^2 of their border colour
    on the starting noise's per-channel means (4 regressors: ~0.13 by chance at n = 32), averaged
    over RGB and backgrounds, and the detected-background accuracy of those images.
    """
    size = world_image_size(components)
    channels = components.unet.config.in_channels
    seeds = [seed + i for i in range(n)]
    means = initial_noise(seeds, (size // 8, size // 8), channels).mean(dim=(2, 3)).numpy()
    r2, acc = [], []
    for bg in backgrounds:
        imgs = sample(components, [f"a red circle, on a {bg} background, flat style"] * n, seeds, size=size)
        r2.append(float(r_squared(means, np.stack([border_rgb(im) for im in imgs])).mean()))
        acc.append(float(np.mean([detect(im).background == bg for im in imgs])))
    return {"r2": float(np.mean(r2)), "accuracy": float(np.mean(acc)), "n": n,
            "per_background": {bg: {"r2": a, "accuracy": b} for bg, a, b in zip(backgrounds, r2, acc)}}


def evaluate(folder: Path, device: str, n_prompts: int, seed: int) -> dict:
    loaded = load_sdxl(folder, dtype=torch.float32)
    for m in (loaded.unet, loaded.vae, loaded.text_encoder_1, loaded.text_encoder_2):
        m.to(device)
    scenes = held_out_scenes(n_prompts, seed + 20)
    res = prompt_following(loaded, scenes)
    novel = [random_scene(random.Random(seed + 30 + i), shapes=SHAPES, colours=COLOURS) for i in range(n_prompts)]
    res["vae_roundtrip_held_out"] = vae_roundtrip(loaded, scenes)
    res["vae_roundtrip_all_shapes_colours"] = vae_roundtrip(loaded, novel)
    res["background_from_noise"] = background_from_noise(loaded, n=max(8, min(32, n_prompts)))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="quality/assets/prior")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    ap.add_argument("--quick", action="store_true", help="a few steps only (pipeline check)")
    ap.add_argument("--eval-only", action="store_true", help="only re-measure the prior saved in --out")
    ap.add_argument("--size", type=int, default=IMAGE_SIZE,
                    help="image side of the world in pixels, a multiple of 8 (latents size / 8)")
    ap.add_argument("--init-from", default=None, metavar="PRIOR",
                    help="continue training that prior (UNet, text encoders and VAE) instead of starting "
                         "from random weights; the VAE is kept as it is")
    ap.add_argument("--vae-from", default=None, metavar="PRIOR",
                    help="reuse that prior's VAE (and its scaling_factor) instead of training one; "
                         "it is fully convolutional, so a 64 px VAE also encodes 128 px images")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None)
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    t0 = time.time()
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _main(args, device, t0)
    finally:
        torch.set_num_threads(threads)


def _main(args, device: str, t0: float) -> int:
    hp = dict(QUICK if args.quick else FULL)
    hp.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    torch.manual_seed(args.seed)
    if args.eval_only:
        res = evaluate(Path(args.out), device, hp["eval_prompts"], args.seed)
        print(json.dumps(res, indent=2))
        return 0
    log(f"device {device}, threads {torch.get_num_threads()}, settings {hp}", t0)
    size = args.size
    if size % 8 or size < 32:
        raise SystemExit(f"--size must be a multiple of 8, at least 32 (got {size})")
    c = load_sdxl(Path(args.init_from), dtype=torch.float32) if args.init_from else build_world_sdxl(args.seed, size)
    if args.init_from and world_image_size(c) != size:
        raise SystemExit(f"{args.init_from} is a {world_image_size(c)} px prior; pass --size {world_image_size(c)}")
    scenes = pretraining_scenes(hp["n_train"], args.seed + 10)
    if args.vae_from or args.init_from:
        if args.vae_from:
            c.vae = load_sdxl(Path(args.vae_from), dtype=torch.float32).vae
        c.vae.to(device).eval()
        c.vae.register_to_config(sample_size=size)
        raw = encode_scenes(c.vae, scenes, device, size=size)
        scale = float(c.vae.config.scaling_factor)
        log(f"{'continuing ' + args.init_from + '; ' if args.init_from else ''}"
            f"VAE from {args.vae_from or args.init_from}; encoded {len(scenes)} scenes at {size} px; latent std "
            f"{raw.std():.4f}, scaling_factor kept at {scale:.5f}", t0)
    else:
        # most steps on 32 px crops (4x cheaper; the VAE is fully convolutional), then full images
        train_vae(c.vae, hp["vae_steps"], hp["vae_batch"], hp["vae_lr"], args.seed, device, t0,
                  crop=hp["vae_crop"], size=size)
        train_vae(c.vae, hp["vae_full_steps"], hp["vae_batch"] // 2, hp["vae_lr"] / 4, args.seed + 5, device,
                  t0, crop=size, size=size)
        raw = encode_scenes(c.vae, scenes, device, size=size)
        scale = float(1.0 / raw.std())
        c.vae.register_to_config(scaling_factor=scale)
        log(f"encoded {len(scenes)} scenes; latent std {raw.std():.4f} -> scaling_factor {scale:.5f}", t0)
    train_unet(c, raw * scale, scenes, hp["unet_steps"], hp["unet_batch"], hp["unet_lr"], args.seed, device, t0,
               size=size, noise_offset=hp["noise_offset"])
    out = Path(args.out)
    for m in (c.unet, c.vae, c.text_encoder_1, c.text_encoder_2):
        m.to("cpu", torch.float16)
    save_tiny_sdxl(c, out)
    log(f"saved {out}", t0)
    res = evaluate(out, device, hp["eval_prompts"], args.seed)
    res.update(settings=hp, seed=args.seed, size=size, vae_from=args.vae_from, init_from=args.init_from, device=device,
               train_seconds=round(time.time() - t0, 1))
    (out / "prompt_following.json").write_text(json.dumps(res, indent=2) + "\n")
    log("prompt following on held-out prompts (accuracy of the detected attribute): " + ", ".join(
        f"{k} {res[k]:.3f}" for k in ("present",) + ATTRS), t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
