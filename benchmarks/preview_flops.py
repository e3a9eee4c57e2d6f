"""What the node's previews cost against training, for SDXL at 1024 px, counted in FLOPs.

    python -m benchmarks.preview_flops [--resolution 1024] [--markdown FILE]

Counts with torch's FlopCounterMode on the meta device (no weights, no memory, any machine, about
10 s on CPU): the real SDXL base UNet and VAE layouts (benchmarks/common.py), batch 1.
- One APT training step (the default 'fastest' preset): the prior's forward (no grad, LoRA off),
  the fine-tuned forward and its backward. The base weights are frozen, so the backward computes
  the gradients of the activations only (the LoRA's own weight gradients are ~0.1% and left out).
  'low-vram' adds one recomputed forward (gradient checkpointing).
- One preview prompt: nodes/previews.py's STEPS sampler steps with guidance (cond and uncond: two
  UNet passes per step) plus one VAE decode to pixels.
The LoRA's own matmuls (rank 32 beside each projection) are left out of both sides.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .common import REPO_ROOT, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

PREVIEW_STEPS, PREVIEW_PROMPTS, PREVIEW_EVERY = 12, 3, 100  # nodes/previews.py and the node defaults (a test compares)
DEFAULT_STEPS = 500  # the APT Trainer's default run length
TOKENS = 77


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_flops(resolution: int) -> tuple[int, int]:
    """(forward, backward to the input) FLOPs of SDXL's UNet for one 1 x 4 x r/8 x r/8 latent."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).requires_grad_(False)
        side = resolution // 8
        x = torch.randn(1, 4, side, side, requires_grad=True)
        t = torch.tensor([500])
        text = torch.randn(1, TOKENS, SDXL_UNET_CONFIG["cross_attention_dim"])
        added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}

    def forward():
        return unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample

    fwd = _count(forward)
    out = forward()
    bwd = _count(lambda: out.sum().backward())
    return fwd, bwd


def vae_decode_flops(resolution: int) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG).requires_grad_(False)
        z = torch.randn(1, 4, resolution // 8, resolution // 8)
    with torch.no_grad():
        return _count(lambda: vae.decode(z))


def timed_estimate(speed_json: Path) -> list[str]:
    """Lines turning the count into time with a GPU speed run's medians (no-grad forward with the
    LoRA off, as the preview's sampler runs it, and the full APT step); empty without the file."""
    import json

    try:
        data = json.loads(speed_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rows = {(r["id"], r["gradient_checkpointing"]): r.get("median_ms") for r in data["rows"]}
    fwd, step = rows.get(("forward_lora_off", None)), rows.get(("apt", False))
    if not (fwd and step):
        return []
    unet_s = PREVIEW_STEPS * 2 * fwd / 1000
    return [f"- in time, from `{speed_json.relative_to(REPO_ROOT)}` ({data['machine'].get('gpu', 'GPU')}): "
            f"the {PREVIEW_STEPS * 2} UNet passes of a prompt take {PREVIEW_STEPS * 2} x {fwd:.1f} ms = "
            f"{unet_s:.2f} s against {step:.0f} ms per APT step, {unet_s * 1000 / step:.1f} steps before the "
            "VAE decode (not timed there)", ""]


def report(resolution: int, speed_json: Path | None = None) -> str:
    fwd, bwd = unet_flops(resolution)
    dec = vae_decode_flops(resolution)
    step = 2 * fwd + bwd
    step_low = step + fwd
    prompt = PREVIEW_STEPS * 2 * fwd + dec
    per_100 = PREVIEW_PROMPTS * prompt / (PREVIEW_EVERY * step)
    renders = DEFAULT_STEPS // PREVIEW_EVERY + 1  # steps 0, 100, ..., 500 (the last is one of them)
    t = 1e12
    return "\n".join([
        f"# Preview cost against training: SDXL at {resolution} px, counted in FLOPs",
        "",
        f"- command: `python -m benchmarks.preview_flops --resolution {resolution}` (torch FlopCounterMode on "
        "the meta device; machine-independent)",
        f"- torch {torch.__version__}",
        "",
        "| what | TFLOPs |",
        "|---|---|",
        f"| UNet forward, batch 1 | {fwd / t:.2f} |",
        f"| UNet backward to the input (frozen weights) | {bwd / t:.2f} |",
        f"| VAE decode to {resolution} px | {dec / t:.2f} |",
        f"| APT training step, 'fastest' (prior fwd + fine-tuned fwd + bwd) | {step / t:.2f} |",
        f"| APT training step, 'low-vram' (+ recomputed fwd) | {step_low / t:.2f} |",
        f"| one preview prompt ({PREVIEW_STEPS} steps x 2 passes + decode) | {prompt / t:.2f} |",
        "",
        f"- one preview prompt = **{prompt / step:.1f}** training steps ('fastest'; "
        f"{prompt / step_low:.1f} with 'low-vram')",
        f"- the default {PREVIEW_PROMPTS} prompts every {PREVIEW_EVERY} steps add **{100 * per_100:.0f}%** "
        f"to the training's FLOPs ({100 * PREVIEW_PROMPTS * prompt / (PREVIEW_EVERY * step_low):.0f}% "
        "with 'low-vram'); sampling runs without autograd, so on a GPU it is usually faster per FLOP",
        f"- a default run ({DEFAULT_STEPS} steps) also renders step 0 (the base model): {renders} renders, "
        f"**{100 * renders * PREVIEW_PROMPTS * prompt / (DEFAULT_STEPS * step):.0f}%** on top of its training "
        f"({100 * renders * PREVIEW_PROMPTS * prompt / (DEFAULT_STEPS * step_low):.0f}% with 'low-vram')",
        "",
        *(timed_estimate(speed_json) if speed_json and resolution == 1024 else []),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preview_flops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--markdown", help="also write the table here")
    args = p.parse_args(argv)
    text = report(args.resolution, REPO_ROOT / "benchmarks" / "results" / "speed_sdxl_h100.json")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
