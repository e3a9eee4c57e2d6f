"""Where the prior drift comes from: per prompt without the concept, how far the fine-tuned images
move from the prior's (drift_px) and which detected attributes change.

`drift_px` averages over the drift prompts. This splits it per prompt and sets it against a
yardstick: the prior against itself on other seeds, i.e. how much two equally good samples of
the same prompt differ. A LoRA drift well above that is a systematic change of what is drawn,
not sampling noise.

    python -m quality.drift_breakdown --config quality/configs/world128c_cosine.json \\
        --runs /tmp/q/cos_baseline_s0 /tmp/q/cos_apt_s0 ... --out drift.md

Reads the drift images kept in each --runs folder (images.npz of `python -m quality.run`: the
last evaluation of the first seed of each method) with the prompts from the run's results.json.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch

from .bench import load_prior
from .task import drift_prompts, drift_seeds, load_config
from .metrics import ALL_ATTRS, drift_px
from .models import world_image_size
from .sampling import sample
from .textio import print_and_save, read_results
from .world import Detection, detect


def reseeded_drift(cfg: dict, prior_images: np.ndarray, offsets: tuple[int, ...] = (777, 1554, 2331, 3108),
                   ) -> list[float]:
    """drift_px of the prior against itself on other seeds, per drift prompt (mean over offsets).

    prior_images: (n_prompts, H, W, 3) uint8, the prior's drift images on the runs' own seeds.
    """
    c = load_prior(cfg)
    prompts, seeds = drift_prompts(cfg), drift_seeds(cfg)
    kw = dict(steps=cfg["eval"]["sampling_steps"], guidance=cfg["eval"]["guidance"], size=world_image_size(c))
    others = [sample(c, prompts, [s + off for s in seeds], **kw) for off in offsets]
    return [float(np.mean([drift_px(o[i], prior_images[i]) for o in others])) for i in range(len(prompts))]


def attribute_changes(before: Detection, after: Detection) -> list[tuple[str, object, object]]:
    """(attribute, prior's value, fine-tuned value) for every attribute that differs."""
    return [(a, getattr(before, a), getattr(after, a)) for a in ALL_ATTRS
            if getattr(before, a) != getattr(after, a)]


def describe(d: Detection) -> str:
    """What the detectors read, in the prompt's words: 'red circle, small, top left, flat, sky'."""
    if not d.present:
        return f"nothing, {d.background}"
    return f"{d.colour} {d.shape}, {d.size_name}, {d.position}, {d.style}, {d.background}"


def _fmt_changes(counter: collections.Counter, n: int) -> str:
    return ", ".join(f"{a} {b}→{c} {k}/{n}" for (a, b, c), k in counter.most_common()) or "—"


def report(cfg: dict, runs: list[Path], reseed: bool = True) -> str:
    rot = float(cfg["eval"].get("shape_rotation_deg", 0.0))
    prompts: list[str] = []
    px: dict[str, list[list[float]]] = {}
    changes: dict[str, list[collections.Counter]] = {}
    prior_reads: list[collections.Counter] = []
    for run in runs:
        run_prompts = read_results(run)["drift_prompts"]
        if prompts and run_prompts != prompts:
            raise SystemExit(f"{run} has other drift prompts than {runs[0]}")
        prompts = run_prompts
        prior_reads = prior_reads or [collections.Counter() for _ in prompts]
        with np.load(run / "images.npz") as z:
            prior = z["prior_drift"]  # an NpzFile decompresses on every lookup
            prior_dets = [detect(im, rotation_deg=rot) for im in prior]
            for i, d in enumerate(prior_dets):
                prior_reads[i][describe(d)] += 1
            for m in (f[:-len("_drift")] for f in z.files if f.endswith("_drift") and f != "prior_drift"):
                px.setdefault(m, [[] for _ in prompts])
                changes.setdefault(m, [collections.Counter() for _ in prompts])
                for i, img in enumerate(z[m + "_drift"]):
                    px[m][i].append(drift_px(img, prior[i]))
                    changes[m][i].update(attribute_changes(prior_dets[i], detect(img, rotation_deg=rot)))
    methods = list(px)
    yard = reseeded_drift(cfg, prior) if reseed else None
    counts = ", ".join(f"{m} {len(px[m][0])}" for m in methods)
    lines = [f"drift_px per prompt without the concept (mean over the run folders: {counts}; "
             "the prior's own image is the same in every folder):", "",
             "| prompt | the prior draws | " + ("prior, other seeds | " if yard else "")
             + " | ".join(methods) + " |",
             "|---|---|" + ("---|" if yard else "") + "---|" * len(methods)]
    for i, p in enumerate(prompts):
        cells = [f"{np.mean(px[m][i]):.3f}" for m in methods]
        lines.append(f"| {p} | {prior_reads[i].most_common(1)[0][0]} | " + (f"{yard[i]:.3f} | " if yard else "")
                     + " | ".join(cells) + " |")
    mean_cells = [f"**{np.mean([np.mean(v) for v in px[m]]):.3f}**" for m in methods]
    lines.append("| **mean** | | " + (f"**{np.mean(yard):.3f}** | " if yard else "") + " | ".join(mean_cells) + " |")
    lines += ["", "Detected attributes that change from the prior's image (attribute prior→fine-tuned, "
              "count over run folders):", "", "| prompt | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for i, p in enumerate(prompts):
        lines.append(f"| {p} | " + " | ".join(_fmt_changes(changes[m][i], len(px[m][i])) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quality.drift_breakdown", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the runs' config (for the prior and the yardstick)")
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="folders written by quality.run")
    p.add_argument("--no-reseed", action="store_true", help="skip sampling the prior on other seeds")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text = report(load_config(args.config), args.runs, reseed=not args.no_reseed)
    print_and_save(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
