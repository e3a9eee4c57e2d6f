"""Look inside one benchmark run: what the augmented training samples look like, what the LoRA
draws for the references' own caption, and how well it denoises the references per timestep bin.

    python -m quality.diagnose --config quality/configs/learnable_border.json --method ata --seed 1 \
        --steps 750 --out /tmp/diag_ata_s1

Writes `diagnosis.json` and `diagnosis.png` (rows: the references; augmented copies as trained,
after the VAE round trip the LoRA actually sees; the references' caption sampled with the LoRA)
and prints what the detectors read from each sample, the denoising loss per timestep bin (LoRA
vs prior, on the unaugmented references) and what the VAE keeps of the concept at each zoom-out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apt_core.augment import draw_augmentation, zoom_rotate
from apt_core.backbone import DiffusersSDXLBackbone
from apt_core.conditioning import CachedDataset
from apt_core.models import SDXLComponents, cache_dataset, encode_pixels
from apt_core.sampling import to_uint8_images
from apt_core.trainer import AptTrainer

from . import plot
from .bench import apt_config, ensure_variants, load_prior, predict_with_and_without_lora
from .task import Record, load_config_with_sets, reference_captions, reference_scenes, to_pixels
from .models import world_image_size
from .sampling import decode, sample
from .world import Scene, detect, render


@dataclass
class PreparedRun:
    """A benchmark run's trainer on the config's prior and references, not yet trained."""

    components: SDXLComponents
    dataset: CachedDataset
    backbone: DiffusersSDXLBackbone
    trainer: AptTrainer
    size: int
    rotation_deg: float
    refs: list[Scene]
    ref_caption: str


def prepare_run(cfg: dict, method: str, seed: int) -> PreparedRun:
    """Load the prior, cache the references (with pixels, for pixel-space augmentation) and build
    the trainer of `method` / `seed` exactly as quality.run does. Call trainer.close() when done."""
    if cfg["augment_fill"] == "background":
        raise SystemExit("this diagnostic does not implement the benchmark's 'background' fill; use quality.run")
    if cfg["device"] == "cpu" and cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    c = load_prior(cfg)
    dev = cfg["device"]
    for m in (c.unet, c.vae, c.text_encoder_1, c.text_encoder_2):
        m.to(dev)
    size = world_image_size(c)
    refs = reference_scenes(cfg)
    ref_caps = reference_captions(cfg)
    ref_cap = ref_caps[0]  # what the diagnostics sample for "the references' caption"
    records = [Record(to_pixels(render(s, size)), cap, f"ref{i}", (size, size), (0, 0), (size, size))
               for i, (s, cap) in enumerate(zip(refs, ref_caps))]
    dataset = cache_dataset(c, records, dev, torch.float32, keep_pixels=True)
    acfg = apt_config(cfg, method, seed)
    ensure_variants(dataset, acfg, lambda px: encode_pixels(c, px))
    backbone = DiffusersSDXLBackbone.from_components(c)
    trainer = AptTrainer(backbone, dataset, acfg, encode_pixels=lambda px: encode_pixels(c, px))
    return PreparedRun(c, dataset, backbone, trainer, size, float(cfg["eval"].get("shape_rotation_deg", 0.0)),
                       refs, ref_cap)


def _label(d) -> str:
    if not d.present:
        return "none"
    return f"{d.colour} {d.shape} {d.size:.2f} iou {d.shape_iou:.2f}"


def bin_losses(backbone, lora, dataset, draws_per_bin: int = 16, bins: int = 10,
               seed: int = 123) -> dict[str, list[float]]:
    """Denoising MSE of the fine-tuned model and of the prior on the (unaugmented) references,
    per timestep bin, over fixed draws: {"ft": [B], "pre": [B]}."""
    g = torch.Generator().manual_seed(seed)
    width = 1000 // bins
    idx = [i % len(dataset) for i in range(draws_per_bin)]
    out = {"ft": [], "pre": []}
    for b in range(bins):
        ts = torch.randint(b * width, (b + 1) * width, (draws_per_bin,), generator=g)
        lat = [dataset.examples[i].latent.float() for i in idx]
        noise = list(torch.randn(len(idx), *lat[0].shape, generator=g))
        ft, pre, n = predict_with_and_without_lora(backbone, lora, lat, [dataset.examples[i].cond for i in idx],
                                                   ts.tolist(), noise)
        out["ft"].append(float((ft - n).pow(2).mean()))
        out["pre"].append(float((pre - n).pow(2).mean()))
    return out


@torch.no_grad()
def zoom_round_trips(c, concept: dict, size: int, rotation_deg: float,
                     zooms=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0), angles=(0.0, 15.0)) -> list[dict]:
    """What the VAE keeps of the concept (large, centred, as in the references) zoomed out by each
    zoom and turned by each angle with ATA's own warp: one row per (zoom, angle) with the shape
    read on the warped image, on its VAE round trip (pixel-space augmentation) and on the decoded
    warp of its latent (latent-space augmentation: the cached latent warped, then decoded)."""
    scene = Scene(concept["shape"], concept["colour"], concept["style"], concept["background"], "centre",
                  "large", 0.5, 0.5, 0.52)
    img = to_pixels(render(scene, size))[None]
    img_latent = encode_pixels(c, img)
    rows = []
    for z in zooms:
        for a in angles:
            warped = zoom_rotate(img, torch.tensor([z]), torch.tensor([a]), "border")
            u8 = to_uint8_images(warped)[0]
            trip = detect(decode(c, encode_pixels(c, warped))[0], rotation_deg=rotation_deg)
            latent = zoom_rotate(img_latent, torch.tensor([z]), torch.tensor([a]), "border")
            lat = detect(decode(c, latent)[0], rotation_deg=rotation_deg)
            rows.append({"zoom": z, "angle": a, "warped_shape": detect(u8, rotation_deg=rotation_deg).shape,
                         "trip_shape": trip.shape, "trip_colour": trip.colour, "trip_size": trip.size,
                         "latent_warp_shape": lat.shape, "latent_warp_colour": lat.colour,
                         "latent_warp_size": lat.size})
    return rows


def augmented_examples(c, dataset, cfg_aug, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(augmented pixels as uint8, their VAE round trip as uint8), n each, from the references."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.stack([dataset.examples[i % len(dataset)].pixels for i in range(n)])
    draw = draw_augmentation(n, cfg_aug, g)
    aug = zoom_rotate(pixels, draw.zoom, draw.angle, cfg_aug.fill, -1.0)
    trip = decode(c, encode_pixels(c, aug))
    return to_uint8_images(aug), trip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--method", default="ata")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="train this many steps (default: the config's)")
    ap.add_argument("--samples", type=int, default=16, help="images of the references' caption")
    ap.add_argument("--set", action="append", default=[], metavar="JSON",
                    help='extra apt_config overrides, e.g. \'{"augment": {"rotation_deg": 0}}\'')
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    cfg, over = load_config_with_sets(args.config, args.set)
    t0 = time.time()
    run = prepare_run(cfg, args.method, args.seed)
    c, dataset, backbone, trainer = run.components, run.dataset, run.backbone, run.trainer
    size, rot, refs, ref_cap = run.size, run.rotation_deg, run.refs, run.ref_caption
    steps = args.steps or trainer.config.train.steps
    try:
        for _ in range(steps):
            event = trainer.train_step()
        losses = bin_losses(backbone, trainer.lora, dataset)
        seeds = [cfg["eval"]["sample_seed"] + 40_000 + i for i in range(args.samples)]
        imgs = sample(c, [ref_cap] * args.samples, seeds, steps=cfg["eval"]["sampling_steps"],
                      guidance=cfg["eval"]["guidance"], size=size)
        gammas, aug_rate = event.gamma, event.aug_rate
    finally:
        trainer.close()
    dets = [detect(im, rotation_deg=rot) for im in imgs]
    aug_px, aug_trip = augmented_examples(c, dataset, trainer.config.augment, 8)
    trip_dets = [detect(im, rotation_deg=rot) for im in aug_trip]
    zooms = zoom_round_trips(c, cfg["concept"], size, rot)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": args.config, "method": args.method, "seed": args.seed, "steps": steps,
              "overrides": over, "gamma": gammas, "aug_rate_last50": aug_rate,
              "bin_loss_ft": losses["ft"], "bin_loss_pre": losses["pre"],
              "ref_caption_detections": [d.to_dict() for d in dets],
              "augmented_round_trip_detections": [d.to_dict() for d in trip_dets],
              "image_size": size, "shape_rotation_deg": rot, "zoom_round_trips": zooms,
              "seconds": round(time.time() - t0, 1)}
    (out / "diagnosis.json").write_text(json.dumps(result, indent=1))
    refs_u8 = [render(s, size) for s in refs]
    rows = [("references", refs_u8), ("augmented", list(aug_px)), ("aug. VAE trip", list(aug_trip)),
            (f"{args.method} s{args.seed} @{steps}", list(imgs[:8])), ("", list(imgs[8:16]))]
    plot.grid([r for r in rows if len(r[1])]).save(out / "diagnosis.png")
    print(f"{args.method} seed {args.seed} step {steps} ({result['seconds']} s)")
    print("gamma:", " ".join(f"{g:.2f}" for g in gammas), f"aug rate {aug_rate:.2f}")
    print("loss ft :", " ".join(f"{v:.4f}" for v in losses["ft"]))
    print("loss pre:", " ".join(f"{v:.4f}" for v in losses["pre"]))
    for i, d in enumerate(dets):
        print(f"  ref-caption sample {i:2d}: {_label(d)}")
    print("augmented round trips:", "; ".join(_label(d) for d in trip_dets))
    print(f"the concept zoomed out / turned, then through the VAE ({size} px; shape read with "
          f"rotation tolerance {rot:g} deg):")
    for r in zooms:
        print(f"  zoom {r['zoom']:.2f} angle {r['angle']:4.1f}: warped {r['warped_shape']}, VAE trip "
              f"{r['trip_colour']} {r['trip_shape']} size {r['trip_size']:.2f}, latent warp decoded "
              f"{r['latent_warp_colour']} {r['latent_warp_shape']} size {r['latent_warp_size']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
