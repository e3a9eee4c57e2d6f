"""What colour the learned concept is drawn in, per background of the prompt, and whether the prior
itself can draw that colour there.

The concept is a blue cross photographed on one (white) background. A LoRA that learned it can still
draw it in another colour in new contexts, which `identity` counts as a miss. This tells apart the
two causes: the prior cannot draw blue on that background (a prior limit), or the LoRA learned the
colour together with the references' background (the concept's colour is entangled with its
context, which no APT part is designed to separate).

    python -m quality.concept_colour --config quality/configs/world128c.json \\
        --runs quality/report_world128c /tmp/q/cos_apt_s0 ... --out colour.md

Part 1 samples the prior on "a <colour> <shape>, on a <background> background" for the pretraining
shapes (the concept's shape is new) and reads the colour back. Part 2 reads every concept image
kept in the --runs folders (images.npz of `python -m quality.run`: the last evaluation of the
first seed of each method, prompts from the run's own results.json) and counts the detected colour
of the drawn crosses per prompt background.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import torch

from .bench import load_prior
from .task import concept_prompts, load_config
from .models import world_image_size
from .sampling import sample
from .textio import print_and_save, read_results
from .world import detect

PRIOR_SHAPES = ("square", "circle", "triangle")


def prior_colour_table(cfg: dict, backgrounds: list[str], per_shape: int = 4, seed: int = 2000,
                       ) -> dict[str, collections.Counter]:
    """background -> Counter of the colour the prior draws for "a <concept colour> <shape>, on a
    <background> background" (per_shape seeds for each pretraining shape; '-' = nothing drawn)."""
    c = load_prior(cfg)
    colour = cfg["concept"]["colour"]
    size = world_image_size(c)
    out = {}
    for bg in backgrounds:
        prompts = [f"a {colour} {s}, on a {bg} background" for s in PRIOR_SHAPES for _ in range(per_shape)]
        images = sample(c, prompts, list(range(seed, seed + len(prompts))), steps=cfg["eval"]["sampling_steps"],
                        guidance=cfg["eval"]["guidance"], size=size)
        out[bg] = collections.Counter(d.colour if d.present else "-" for d in map(detect, images))
    return out


def concept_colours(images: np.ndarray, requested: list[dict], samples_per_prompt: int, shape: str,
                    rotation_deg: float) -> dict[str, collections.Counter]:
    """background of the prompt -> Counter of the detected colour of the objects drawn as `shape`.

    images: (n_prompts * samples_per_prompt, H, W, 3) uint8 in prompt order; requested: the
    attributes each prompt asked for.
    """
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i, img in enumerate(images):
        d = detect(img, rotation_deg=rotation_deg)
        if d.present and d.shape == shape:
            out[requested[i // samples_per_prompt]["background"]][d.colour] += 1
    return out


def _fmt(counter: collections.Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common()) or "—"


def report(cfg: dict, runs: list[Path], prior_check: bool = True) -> str:
    con = cfg["concept"]
    _, reqs = concept_prompts(cfg)
    backgrounds = list(dict.fromkeys(r["background"] for r in reqs))
    rot = float(cfg["eval"].get("shape_rotation_deg", 0.0))
    lines = [f"Concept: a {con['colour']} {con['shape']} on a {con['background']} background.", ""]
    if prior_check:
        lines += [f"**The prior** drawing \"a {con['colour']} <shape>, on a <background> background\" "
                  f"({', '.join(PRIOR_SHAPES)}; colour read back from the image):", "",
                  "| background | detected colour (count) |", "|---|---|"]
        for bg, cnt in prior_colour_table(cfg, [con["background"], *backgrounds]).items():
            lines.append(f"| {bg} | {_fmt(cnt)} |")
        lines.append("")
    lines += [f"**The fine-tuned models**: detected colour of the images drawn as a {con['shape']}, per "
              "background of the concept prompt (the last evaluation of each run kept in images.npz):", "",
              "| run | method | " + " | ".join(backgrounds) + " |", "|---|---|" + "---|" * len(backgrounds)]
    totals: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: collections.defaultdict(collections.Counter))
    for run in runs:
        run_cfg = read_results(run)["config"]
        run_reqs, run_k = concept_prompts(run_cfg)[1], int(run_cfg["eval"]["samples_per_prompt"])
        with np.load(run / "images.npz") as z:
            methods = [m for m in z.files if m not in ("references", "prior") and not m.endswith("_drift")]
            for m in methods:
                per_bg = concept_colours(z[m], run_reqs, run_k, con["shape"], rot)
                for bg, cnt in per_bg.items():
                    totals[m][bg].update(cnt)
                lines.append(f"| `{run}` | {m} | " + " | ".join(_fmt(per_bg.get(bg, collections.Counter()))
                                                             for bg in backgrounds) + " |")
    if len(runs) > 1:
        for m, per_bg in totals.items():
            lines.append(f"| **all** | {m} | " + " | ".join(_fmt(per_bg.get(bg, collections.Counter()))
                                                          for bg in backgrounds) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quality.concept_colour", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--runs", nargs="+", default=[], type=Path, help="folders written by quality.run")
    p.add_argument("--no-prior-check", action="store_true", help="skip sampling the prior (part 1)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text = report(load_config(args.config), args.runs, prior_check=not args.no_prior_check)
    print_and_save(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
