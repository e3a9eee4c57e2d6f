"""The README demo's data: the benchmark's reference photos, captions and before/after prompts.

`python -m quality.demo_data --out output/demo` writes, deterministically from a benchmark config
(default quality/configs/default.json, the same task as the benchmark):
  photos/ref_0.png ... + same-name .txt captions   the concept's reference images (at the size of
                                                   the config's prior: 64 or 128 px)
  prompts.txt                                      prompts for `python -m apt_core --sample-prompts`:
                                                   the references' caption, concept prompts with
                                                   another background / position / size / style,
                                                   and prompts without the concept (prior drift)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from .task import concept_prompts, drift_prompts, load_config, reference_caption, reference_captions, reference_scenes
from .world import render

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.json"


def prior_image_size(prior: str | Path) -> int:
    """The world's image side in pixels of a prior folder, read from its VAE config (no weights)."""
    return int(json.loads((Path(prior) / "vae" / "config.json").read_text(encoding="utf-8"))["sample_size"])


def demo_prompts(cfg: dict, n_concept: int = 4, n_drift: int = 1) -> list[str]:
    """The references' caption, the first n_concept concept prompts and n_drift drift prompts."""
    return [reference_caption(cfg)] + concept_prompts(cfg)[0][:n_concept] + drift_prompts(cfg)[:n_drift]


def write_demo_data(out: str | Path, config: str | Path = DEFAULT_CONFIG, n_concept: int = 4,
                    n_drift: int = 1) -> Path:
    """Write photos/ (+ captions) and prompts.txt into `out`; returns the photos folder."""
    cfg = load_config(config)
    photos = Path(out) / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    size = prior_image_size(cfg["prior"])
    for i, (scene, cap) in enumerate(zip(reference_scenes(cfg), reference_captions(cfg))):
        Image.fromarray(render(scene, size)).save(photos / f"ref_{i}.png")
        (photos / f"ref_{i}.txt").write_text(cap + "\n", encoding="utf-8")
    lines = ["# before/after prompts of the demo (quality/demo_data.py): the references' caption,",
             "# the concept in other contexts, and a prompt without the concept"]
    (Path(out) / "prompts.txt").write_text(
        "\n".join(lines + demo_prompts(cfg, n_concept, n_drift)) + "\n", encoding="utf-8")
    return photos


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quality.demo_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/demo")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    args = p.parse_args(argv)
    photos = write_demo_data(args.out, args.config)
    print(f"demo data: {len(list(photos.glob('*.png')))} reference photos in {photos}, "
          f"prompts in {Path(args.out) / 'prompts.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
