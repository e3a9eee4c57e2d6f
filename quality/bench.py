"""The personalization benchmark: train each method on the task's references, evaluate with exact metrics.

The task itself (config, methods, references, prompts) is `task.py`; the metrics are `metrics.py`.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from apt_core.augment import encode_variants, variants_match, wants_variants
from apt_core.backbone import DiffusersSDXLBackbone
from apt_core.config import AptConfig
from apt_core.models import SDXLComponents, cache_dataset, encode_pixels, load_sdxl
from apt_core.preservation import sample_class_examples
from apt_core.trainer import AptTrainer

from . import metrics as M
from .models import IMAGE_SIZE, build_world_sdxl, conditioning, world_image_size
from .sampling import sample
from .task import (METHODS, Record, concept_prompts, drift_prompts, drift_seeds, reference_captions, reference_scenes,
                   to_pixels)
from .world import BACKGROUNDS, PRETRAIN_SHAPES, SHAPES, Scene, caption, detect, random_scene, render


# ----------------------------------------------------------------------------- data

def _background_fill(dataset, bg_rgb: tuple[int, int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Make apt_core's pixel-space constant fill (-1) mean "the references' background".

    The cached pixels p are stored as p' = p - bg - 1; zoom_rotate fills p' with -1, i.e.
    computes warp(p' + 1) - 1 = warp(p - bg) - 1 (bilinear warping is affine), and the returned
    encoder maps back p = p' + bg + 1 before the VAE: exactly a warp of p with fill colour bg.
    """
    bg = torch.tensor(bg_rgb, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1.0
    for ex in dataset.examples:
        ex.pixels = ex.pixels - bg - 1.0
    return lambda px: px + bg.to(px.device) + 1.0


# ----------------------------------------------------------------------------- evaluation

@dataclass
class EvalSet:
    prompts: list[str]
    requested: list[dict]
    seeds: list[int]
    drift_prompts: list[str]
    drift_seeds: list[int]
    ref_cx: float
    ref_cy: float
    ref_size: float
    size: int = IMAGE_SIZE  # image side of the prior's world in pixels
    shape_rotation_deg: float = 0.0  # detect(): rotations of the shape templates tried
    ref_prompts: list[str] = field(default_factory=list)  # the references' own caption
    ref_seeds: list[int] = field(default_factory=list)
    prior_drift_images: np.ndarray | None = None
    prior_drift_dets: list = field(default_factory=list)
    gap_draws: list = field(default_factory=list)  # (example index, t, noise)
    world_draws: list = field(default_factory=list)  # (latent, cond, t, noise) without the concept
    ceiling: dict = field(default_factory=dict)  # identity metrics of VAE round trips of ideal images

    def detect(self, image: np.ndarray):
        return detect(image, rotation_deg=self.shape_rotation_deg)


def loose_shapes(concept: dict) -> tuple[str, ...]:
    """Shapes that count for identity_loose: every shape the prior never saw when the concept is
    one of them (a small cross decodes to a diamond-like blob), else the concept's shape."""
    novel = tuple(s for s in SHAPES if s not in PRETRAIN_SHAPES)
    return novel if concept["shape"] in novel else (concept["shape"],)


def identity_ceiling(c: SDXLComponents, cfg: dict, es: "EvalSet", refs: list[Scene]) -> dict:
    """identity / identity_loose of a perfect generator: the concept rendered exactly as each
    eval prompt asks (what it does not ask for as in a reference, taken in turn; jittered layout
    from the image's seed), passed through the VAE (encode -> decode) and read by the detectors."""
    from .sampling import decode

    con = cfg["concept"]
    imgs = []
    for i, (req, seed) in enumerate(zip(es.requested, es.seeds)):
        kw = {k: v for k, v in req.items() if k in ("background", "position", "size_name", "style")}
        for k in ("style", "background", "position", "size_name"):
            kw.setdefault(k, getattr(refs[i % len(refs)], k))
        s = random_scene(random.Random(seed), shape=con["shape"], colour=con["colour"], **kw)
        imgs.append(to_pixels(render(s, es.size)))
    dets = [es.detect(im) for im in decode(c, encode_pixels(c, torch.stack(imgs)))]
    return {"identity": M.identity(dets, con["shape"], con["colour"]),
            "identity_loose": M.identity_any(dets, loose_shapes(con), con["colour"])}


def make_eval_set(cfg: dict, refs: list[Scene], c: SDXLComponents) -> EvalSet:
    ev = cfg["eval"]
    prompts, reqs = concept_prompts(cfg)
    k = ev["samples_per_prompt"]
    base = ev["sample_seed"]
    p_all = [p for p in prompts for _ in range(k)]
    r_all = [r for r in reqs for _ in range(k)]
    seeds = [base + i for i in range(len(p_all))]
    es = EvalSet(p_all, r_all, seeds, drift_prompts(cfg), drift_seeds(cfg), float(np.mean([s.cx for s in refs])),
                 float(np.mean([s.cy for s in refs])), float(np.mean([s.size for s in refs])),
                 size=world_image_size(c), shape_rotation_deg=float(ev.get("shape_rotation_deg", 0.0)))
    n_ref = int(cfg["eval"]["ref_samples"])  # images of the references' own caption (ref_identity)
    captions = reference_captions(cfg)
    es.ref_prompts = [captions[i % len(captions)] for i in range(n_ref)]
    es.ref_seeds = [base + 40_000 + i for i in range(n_ref)]
    g = torch.Generator().manual_seed(base + 20_000)
    n_refs = cfg["concept"]["n_images"]
    for i in range(ev["gap_draws"]):
        es.gap_draws.append((i % n_refs, int(torch.randint(0, 1000, (1,), generator=g)),
                             torch.randn(4, es.size // 8, es.size // 8, generator=g)))
    rng = random.Random(base + 30_000)
    for i in range(ev["gap_draws"]):
        s = random_scene(rng)
        latent = encode_pixels(c, to_pixels(render(s, es.size))[None])[0]
        cond = conditioning(c, [caption(s)], size=es.size)
        es.world_draws.append((latent, cond, int(torch.randint(0, 1000, (1,), generator=g)),
                               torch.randn(latent.shape, generator=g)))
    es.ceiling = identity_ceiling(c, cfg, es, refs)
    return es


@torch.no_grad()
def predict_with_and_without_lora(backbone, lora, latents: list[torch.Tensor], conds: list,
                                  ts: list[int], noises: list[torch.Tensor]
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise each latent at its t with its noise and predict it with the LoRA on and off (one
    batched forward each): (eps_ft, eps_pre, noise), each (N, 4, h, w) float on the UNet's device."""
    from apt_core.conditioning import SDXLConditioning

    dev = next(backbone.unet.parameters()).device
    a = backbone.alphas_cumprod[torch.tensor(ts)].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * torch.stack(latents) + (1 - a).sqrt() * torch.stack(noises)).to(dev)
    tt = torch.tensor(ts, device=dev)
    cond = SDXLConditioning.cat(conds).to(dev)
    ft = backbone.predict(x_t, tt, cond).float()
    with lora.disabled():
        pre = backbone.predict(x_t, tt, cond).float()
    return ft, pre, torch.stack(noises).to(dev)


def _eps_terms(backbone, lora, dataset, es: EvalSet) -> tuple[float, float]:
    """(L_pre - L_ft on the references, mean ||eps_ft - eps_pre||^2 on world images without the
    concept), over the eval set's fixed (image, t, noise) draws."""
    ft, pre, n = predict_with_and_without_lora(
        backbone, lora, [dataset.examples[i].latent.float() for i, _, _ in es.gap_draws],
        [dataset.examples[i].cond for i, _, _ in es.gap_draws],
        [t for _, t, _ in es.gap_draws], [z for _, _, z in es.gap_draws])
    gap = float((pre - n).pow(2).mean() - (ft - n).pow(2).mean())
    ft, pre, _ = predict_with_and_without_lora(backbone, lora, *(list(x) for x in zip(*es.world_draws)))
    return gap, float((ft - pre).pow(2).mean())


def score(c: SDXLComponents, cfg: dict, es: EvalSet, concept: dict, keep_images: bool = False) -> dict:
    """Sample the concept and drift prompts with the UNet as it is now and compute the metrics."""
    ev = cfg["eval"]
    kw = dict(steps=ev["sampling_steps"], guidance=ev["guidance"], size=es.size)
    both = sample(c, es.prompts + es.ref_prompts, es.seeds + es.ref_seeds, **kw)
    images, ref_images = both[:len(es.prompts)], both[len(es.prompts):]
    dets = [es.detect(im) for im in images]
    pos, scale = M.spreads(dets, es.ref_cx, es.ref_cy, es.ref_size)
    ref_dets = [es.detect(im) for im in ref_images]
    out = {"identity": M.identity(dets, concept["shape"], concept["colour"]),
           "identity_loose": M.identity_any(dets, loose_shapes(concept), concept["colour"]),
           "context": M.attribute_match(dets, es.requested, M.CONTEXT_ATTRS),
           "layout": M.attribute_match(dets, es.requested, M.LAYOUT_ATTRS),
           "background": M.attribute_match(dets, es.requested, ("background",)),
           "style": M.attribute_match(dets, es.requested, ("style",)),
           "position": M.attribute_match(dets, es.requested, ("position",)),
           "size": M.attribute_match(dets, es.requested, ("size_name",)),
           "present": float(np.mean([d.present for d in dets])),
           "ref_identity": M.identity(ref_dets, concept["shape"], concept["colour"]),
           "ref_identity_loose": M.identity_any(ref_dets, loose_shapes(concept), concept["colour"]),
           "id_shape": float(np.mean([d.present and d.shape == concept["shape"] for d in dets])),
           "id_colour": float(np.mean([d.present and d.colour == concept["colour"] for d in dets])),
           "pos_spread": pos, "scale_spread": scale}
    if es.drift_prompts:
        drift = sample(c, es.drift_prompts, es.drift_seeds, **kw)
        ddets = [es.detect(im) for im in drift]
        if es.prior_drift_images is None:  # the prior itself: no drift by definition
            es.prior_drift_images, es.prior_drift_dets = drift, ddets
        out["drift_px"] = M.drift_px(drift, es.prior_drift_images)
        out["drift_attr"] = M.drift_attr(ddets, es.prior_drift_dets)
        if keep_images:
            out["_drift_images"] = drift
    if keep_images:
        out["_images"] = images
        out["_dets"] = [d.to_dict() for d in dets]
    return out


# ----------------------------------------------------------------------------- runs

def apt_config(cfg: dict, method: str, seed: int) -> AptConfig:
    data = copy.deepcopy(cfg["apt_config"])
    data.setdefault("train", {})["seed"] = seed
    data["switches"] = dict(METHODS[method])
    return AptConfig.from_dict(data).validate()


def fill_description(cfg: dict) -> str:
    """The augmentation fill a config trains with, in words for the report."""
    fill = cfg["apt_config"].get("augment", {}).get("fill", "constant")
    return cfg["augment_fill"] if fill == "constant" else fill


def load_prior(cfg: dict, untrained: bool = False) -> SDXLComponents:
    if untrained:
        c = build_world_sdxl(0)
        c.vae.register_to_config(scaling_factor=1.0)
        return c
    path = Path(cfg["prior"])
    if not path.is_dir():
        raise SystemExit(f"prior not found at {path}; train it with: python -m quality.train_prior --out {path}")
    return load_sdxl(path, dtype=torch.float32)


def run_benchmark(cfg: dict, *, untrained: bool = False, log: Callable[[str], None] = print,
                  on_run: Callable[[dict], None] | None = None) -> dict:
    """Train every (seed, method) pair and evaluate; on_run({"results", "images"}) after each."""
    threads = torch.get_num_threads()
    if cfg["device"] == "cpu" and cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _run(cfg, untrained, log, on_run)
    finally:
        torch.set_num_threads(threads)


def ensure_variants(dataset, acfg: AptConfig, encode) -> None:
    """Encode the references' pixel-space variants for this run's grid unless already encoded."""
    aug = acfg.augmentation
    if wants_variants(aug) and not variants_match(dataset, aug):
        encode_variants(dataset, aug, encode, batch_size=8)


def _run(cfg: dict, untrained: bool, log: Callable[[str], None], on_run) -> dict:
    t0 = time.time()
    c = load_prior(cfg, untrained)
    dev = cfg["device"]
    for m in (c.unet, c.vae, c.text_encoder_1, c.text_encoder_2):
        m.to(dev)
    refs = reference_scenes(cfg)
    size = world_image_size(c)
    ref_images = [render(s, size) for s in refs]
    ref_caps = reference_captions(cfg)
    ref_cap = ref_caps[0] if len(set(ref_caps)) == 1 else " | ".join(ref_caps)
    records = [Record(to_pixels(im), cap, f"ref{i}", (size, size), (0, 0), (size, size))
               for i, (im, cap) in enumerate(zip(ref_images, ref_caps))]
    regs = apt_config(cfg, cfg["methods"][0], 0).regularizers  # the same for every method
    dataset = cache_dataset(c, records, dev, torch.float32, keep_pixels=True, aa_free_words=regs.aa_free_words,
                            trigger_words=regs.preservation_words)
    if regs.preserves_on_class_images:  # the prior's, drawn once for every seed
        dataset.class_examples = sample_class_examples(c, sorted(set(ref_caps)), regs.trigger_words, regs.class_images,
                                                       size=size, steps=cfg["eval"]["sampling_steps"],
                                                       guidance=cfg["eval"]["guidance"], batch=8)
    enc = lambda px: encode_pixels(c, px)  # noqa: E731
    if cfg["augment_fill"] == "background":
        if isinstance(cfg["concept"]["background"], list):
            raise ValueError("augment_fill 'background' needs one background shared by the references")
        to_real = _background_fill(dataset, BACKGROUNDS[cfg["concept"]["background"]])
        enc = lambda px: encode_pixels(c, to_real(px))  # noqa: E731
        bg_img = np.empty((size, size, 3), np.uint8)
        bg_img[:] = BACKGROUNDS[cfg["concept"]["background"]]
        dataset.fill_latent = encode_pixels(c, to_pixels(bg_img)[None])[0].mean(dim=(1, 2)).cpu()
    es = make_eval_set(cfg, refs, c)
    concept = cfg["concept"]
    log(f"[{time.time() - t0:6.1f}s] {len(refs)} references, caption {ref_cap!r}; "
        f"{len(es.prompts)} concept images and {len(es.drift_prompts)} drift images per evaluation")
    prior = score(c, cfg, es, concept, keep_images=True)
    gap0 = {"eps_gap": 0.0, "eps_dev": 0.0}
    results: dict[str, Any] = {"config": cfg, "reference_caption": ref_cap, "image_size": size,
                               "references": [s.to_dict() for s in refs],
                               "prompts": es.prompts, "drift_prompts": es.drift_prompts,
                               "identity_ceiling": es.ceiling,
                               "prior": {k: v for k, v in prior.items() if not k.startswith("_")} | gap0,
                               "runs": {}}
    images = {"references": np.stack(ref_images), "prior": prior["_images"], "prior_drift": prior["_drift_images"]}
    log(f"[{time.time() - t0:6.1f}s] prior: " + _fmt(results["prior"]))
    eval_steps = sorted(set(cfg["eval"]["steps"]))
    for seed in cfg["seeds"]:  # seed-major: a partial run already covers every method
        for method in cfg["methods"]:
            acfg = apt_config(cfg, method, seed)
            ensure_variants(dataset, acfg, enc)
            backbone = DiffusersSDXLBackbone.from_components(c)
            trainer = AptTrainer(backbone, dataset, acfg, encode_pixels=enc)
            history, evals = [], []
            try:
                for step in range(1, acfg.train.steps + 1):
                    history.append(trainer.train_step().to_dict())
                    if step in eval_steps:
                        keep = step == eval_steps[-1] and seed == cfg["seeds"][0]
                        e = score(c, cfg, es, concept, keep_images=keep)
                        e["eps_gap"], e["eps_dev"] = _eps_terms(backbone, trainer.lora, dataset, es)
                        e["step"] = step
                        if keep:
                            images[method] = e.pop("_images")
                            images[method + "_drift"] = e.pop("_drift_images")
                        e.pop("_dets", None)
                        evals.append(e)
                        log(f"[{time.time() - t0:6.1f}s] {method} seed {seed} step {step}: " + _fmt(e))
            finally:
                trainer.close()
            results["runs"].setdefault(method, []).append({
                "seed": seed, "evals": evals, "final_gamma": history[-1]["gamma"],
                "history": [{k: h[k] for k in ("step", "loss", "loss_denoise", "loss_rs", "loss_aa", "loss_preserve",
                                               "gamma", "aug_rate", "loss_weight")} for h in history]})
            results["seconds"] = round(time.time() - t0, 1)
            if on_run:
                on_run({"results": results, "images": images})
    results["runs"] = {m: results["runs"][m] for m in cfg["methods"] if m in results["runs"]}
    results["seconds"] = round(time.time() - t0, 1)
    return {"results": results, "images": images}


KEYS = ("identity", "identity_loose", "context", "layout", "pos_spread", "scale_spread", "drift_px", "drift_attr",
        "eps_gap", "eps_dev")


DETAIL = ("ref_identity", "ref_identity_loose", "id_shape", "id_colour", "present", "background", "style", "position", "size")


def _fmt(e: dict) -> str:
    return ", ".join(f"{k} {e[k]:.3f}" for k in KEYS if k in e and isinstance(e[k], float))


def summary(results: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{method: {metric: (mean, std over seeds)}} at the last evaluated step; 'prior' too."""
    out = {"prior": {k: (results["prior"][k], 0.0) for k in KEYS if k in results["prior"]}}
    for method, runs in results["runs"].items():
        finals = [r["evals"][-1] for r in runs if r["evals"]]
        out[method] = {k: M.mean_std([f[k] for f in finals if k in f]) for k in KEYS + DETAIL}
        out[method]["final_gamma_mean"] = M.mean_std([float(np.mean(r["final_gamma"])) for r in runs])
    return out
