"""Standalone APT LoRA training: `python -m apt_core [options]` (or the `apt-train` script).

Trains an SDXL LoRA with APT on a folder of photos, offline. --sample-prompt / --sample-prompts
render the same prompts and seeds with the LoRA off (before) and on (after) into one labelled grid
PNG.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch

from .backbone import DiffusersSDXLBackbone
from .config import FILL_MODES, AptConfig, AptSwitches, AugmentConfig, IndicatorConfig, LoraConfig, \
    RegularizerConfig, TrainConfig
from .errors import AptError
from .images import load_image_folder, records_fingerprint
from .models import cache_dataset, encode_pixels, load_sdxl
from .preservation import CLASS_CACHE_NAME, class_prompts, load_or_sample_class_examples
from .sampling import before_after_grid, on_device, sample, to_uint8_images
from .trainer import AptTrainer, ProgressEvent

PRESETS = {"fastest": False, "low-vram": True}  # -> gradient checkpointing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m apt_core", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--images", help="folder of 3-10 photos (+ same-name .txt captions); required")
    io.add_argument("--model", help="SDXL diffusers folder or single .safetensors file; required")
    io.add_argument("--model-config", help="local diffusers SDXL config folder for single-file models")
    io.add_argument("--out", default="output/apt_lora.safetensors", help="LoRA file to write")
    io.add_argument("--checkpoint-dir", help="default: <out>.checkpoints")
    io.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    io.add_argument("--default-caption", help="caption for images without a .txt file")
    io.add_argument("--resolution", type=int, help="training size; default: the model's native size "
                    "(1024 for SDXL, 64 or 128 for the quality benchmark's priors)")
    io.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--rank", type=int, default=32)
    t.add_argument("--alpha", type=float, help="default: the rank")
    t.add_argument("--lora-ff", action="store_true",
                   help="LoRA also on the transformer feed-forward layers (bigger file, learns more)")
    t.add_argument("--lora-conv", action="store_true",
                   help="LoRA also on the resnet 3x3 convolutions (LoCon; ComfyUI's LoraLoader reads it)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--lr-schedule", choices=("constant", "cosine"), default=TrainConfig.lr_schedule,
                   help="cosine (default) falls to 0 at the last step; constant keeps --lr throughout")
    t.add_argument("--warmup", type=int, default=0, metavar="STEPS",
                   help="raise the learning rate linearly over the first STEPS steps")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--preset", choices=sorted(PRESETS), default="fastest",
                   help="fastest: no gradient checkpointing (SDXL 1024: 14.1 GiB peak, 0.60 s/step on an H100); "
                        "low-vram: gradient checkpointing (7.3 GiB, 1.09 s/step; 12 GB cards)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is "
                   "fastest for small models on a busy machine)")
    a = p.add_argument_group("APT")
    a.add_argument("--baseline", action="store_true", help="plain DreamBooth-LoRA: every APT part off")
    a.add_argument("--no-augment", action="store_true")
    a.add_argument("--no-loss-weight", action="store_true")
    a.add_argument("--no-rs", action="store_true")
    a.add_argument("--no-aa", action="store_true")
    a.add_argument("--lambda-rs", type=float, default=RegularizerConfig.lambda_rs)
    a.add_argument("--lambda-aa", type=float, default=RegularizerConfig.lambda_aa)
    a.add_argument("--aa-free-word", action="append", default=[], metavar="WORD",
                   help="leave this word's tokens (e.g. the trigger word) out of attention alignment; "
                        "repeatable; default: align every token, as the paper does")
    a.add_argument("--preserve", type=float, default=RegularizerConfig.lambda_preserve, metavar="WEIGHT",
                   help="output preservation (not part of APT; 0 = off): keep the prior's prediction for "
                        "each caption without the trigger word; needs --trigger-word; two more UNet forwards and a "
                        "backward per step; in the quality benchmark it cost the subject's colour (quality/README.md)")
    a.add_argument("--class-images", type=int, default=RegularizerConfig.class_images, metavar="N",
                   help="with --preserve: preserve on N images the model draws before training from the captions "
                        "without the trigger word (DreamBooth's class images) instead of on the references")
    a.add_argument("--trigger-word", action="append", default=[], metavar="WORD",
                   help="the word that names the subject in the captions (e.g. sks); repeatable")
    a.add_argument("--p-max", type=float, default=AugmentConfig.p_max)
    a.add_argument("--fill", choices=FILL_MODES, default=AugmentConfig.fill)
    a.add_argument("--augment-space", choices=("pixel", "latent"), default=AugmentConfig.space,
                   help="pixel: zoom/rotate the image, then encode (variants encoded once before training); "
                        "latent: transform the cached latent (no variants to encode, but the subject's "
                        "likeness suffered in the quality benchmark)")
    a.add_argument("--encode-every-step", action="store_true",
                   help="pixel space: encode the exact drawn zoom/rotation at every augmented step "
                        "instead of pre-encoded variants (the VAE stays on the device during training)")
    a.add_argument("--indicator-scale", type=float, default=IndicatorConfig.scale)
    a.add_argument("--print-every", type=int, default=25)
    s = p.add_argument_group("before/after samples (LoRA off vs on, same seeds, one grid PNG)")
    s.add_argument("--sample-prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt to render before and after training (repeatable)")
    s.add_argument("--sample-prompts", metavar="FILE",
                   help="text file with one prompt per line (blank lines and # comments skipped)")
    s.add_argument("--samples-out", metavar="PNG", help="grid to write; default <out>.before_after.png; "
                   "given without prompts, the training captions are rendered")
    s.add_argument("--samples-per-prompt", type=int, default=1, help="images (seeds) per prompt")
    s.add_argument("--sample-steps", type=int, default=25, help="DDIM steps")
    s.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--sample-seed", type=int, default=0, help="seed of the first image; then +1 per image")
    s.add_argument("--sample-size", type=int, help="image side in px; default: the training resolution")
    return p.parse_args(argv)


def sample_prompts(args: argparse.Namespace) -> list[str]:
    """--sample-prompts FILE lines, then every --sample-prompt, in order."""
    prompts = []
    if args.sample_prompts:
        path = Path(args.sample_prompts)
        if not path.is_file():
            raise AptError(f"sample prompt file not found: {path}")
        prompts += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and not ln.lstrip().startswith("#")]
    return prompts + list(args.sample_prompt)


def native_resolution(components) -> int:
    """The image side the UNet was built for: sample_size x the VAE's downsampling factor."""
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    return int(components.unet.config.sample_size) * factor


class BeforeAfter:
    """Renders the sample prompts with the LoRA off (before training) and on (after)."""

    def __init__(self, args: argparse.Namespace, components, prompts: list[str], resolution: int):
        k = max(1, args.samples_per_prompt)
        self.args, self.components, self.prompts = args, components, prompts
        self.all_prompts = [p for p in prompts for _ in range(k)]
        self.seeds = [args.sample_seed + i for i in range(len(self.all_prompts))]
        self.size = args.sample_size or resolution
        self.batch = 32 if self.size <= 256 else 2
        self.before = None

    def render(self, device: torch.device):
        a, started = self.args, time.perf_counter()
        with on_device(self.components, device):
            images = sample(self.components, self.all_prompts, self.seeds, steps=a.sample_steps,
                            guidance=a.cfg, size=self.size, batch=self.batch)
        print(f"rendered {len(images)} sample(s) ({a.sample_steps} DDIM steps, cfg {a.cfg:g}, "
              f"{self.size} px) in {time.perf_counter() - started:.1f}s")
        return images

    def write(self, after, path: Path, title: str, records=()) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        refs = [to_uint8_images(r.pixels[None])[0] for r in records]  # sizes may differ (buckets)
        before_after_grid(self.prompts, self.before, after, title=title, references=refs).save(path)
        return path


def build_config(args: argparse.Namespace) -> AptConfig:
    switches = AptSwitches.baseline() if args.baseline else AptSwitches(
        adaptive_augmentation=not args.no_augment, adaptive_loss_weight=not args.no_loss_weight,
        representation_stabilization=not args.no_rs, attention_alignment=not args.no_aa)
    return AptConfig(
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                          seed=args.seed, checkpoint_every=args.checkpoint_every,
                          lr_schedule=args.lr_schedule, warmup_steps=args.warmup,
                          gradient_checkpointing=PRESETS[args.preset]),
        lora=LoraConfig(rank=args.rank, alpha=args.alpha if args.alpha else float(args.rank),
                        include_feed_forward=args.lora_ff, include_conv=args.lora_conv),
        indicator=IndicatorConfig(scale=args.indicator_scale),
        augment=AugmentConfig(p_max=args.p_max, fill=args.fill, space=args.augment_space,
                              variant_grid=(0, 0) if args.encode_every_step else AugmentConfig.variant_grid),
        regularizers=RegularizerConfig(lambda_rs=args.lambda_rs, lambda_aa=args.lambda_aa,
                                       aa_free_words=tuple(args.aa_free_word),
                                       lambda_preserve=args.preserve, trigger_words=tuple(args.trigger_word),
                                       class_images=args.class_images),
        switches=switches).validate()


def format_event(e: ProgressEvent) -> str:
    gammas = " ".join(f"{g:.2f}" for g in e.gamma)
    return (f"step {e.step:>5}/{e.total_steps}  loss {e.loss:.4f} (denoise {e.loss_denoise:.4f} "
            f"rs {e.loss_rs:.2e} aa {e.loss_aa:.2e}{f' preserve {e.loss_preserve:.2e}' if e.loss_preserve else ''})  aug {e.aug_rate:.2f}  lr {e.lr:.1e}  "
            f"{e.it_per_s:.1f} it/s  eta {e.eta_s:.0f}s\n    gamma per bin (low -> high noise): {gammas}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except AptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    device = torch.device(args.device)
    prompts = sample_prompts(args)
    if args.samples_per_prompt < 1 or args.sample_steps < 1:
        raise AptError("--samples-per-prompt and --sample-steps must be at least 1")
    if not args.model or not args.images:
        raise AptError("give --model (an SDXL diffusers folder or .safetensors file) and --images "
                       "(a folder of photos)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    components = load_sdxl(args.model, dtype=dtype, config=args.model_config)
    resolution = args.resolution or native_resolution(components)
    report = load_image_folder(args.images, resolution=resolution, default_caption=args.default_caption,
                               bucket_step=64 if resolution >= 512 else 8)
    print(report.summary())
    components.unet.to(device)
    started = time.perf_counter()
    every_step = config.augmentation is not None and config.augmentation.encodes_every_step
    dataset = cache_dataset(components, report.records, device, components.unet.dtype,
                            keep_pixels=every_step, variants_for=config.augmentation,
                            aa_free_words=config.regularizers.aa_free_words,
                            trigger_words=config.regularizers.preservation_words)
    n_variants = sum(len(ex.variants) for ex in dataset.examples if ex.variants is not None)
    extra = f" (+{n_variants} augmentation variants)" if n_variants else ""
    print(f"cached {len(dataset)} latents{extra} and captions in {time.perf_counter() - started:.1f}s")
    regs = config.regularizers
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_suffix(".checkpoints")
    if regs.preserves_on_class_images:
        started = time.perf_counter()
        cache = checkpoints / CLASS_CACHE_NAME
        dataset.class_examples, reused = load_or_sample_class_examples(
            components, [r.caption for r in report.records], regs.trigger_words, regs.class_images,
            size=resolution, cache=cache, steps=args.sample_steps, guidance=args.cfg, dtype=components.unet.dtype)
        print(f"{'reused' if reused else 'drew'} {len(dataset.class_examples)} class images for preservation "
              f"({' | '.join(class_prompts([r.caption for r in report.records], regs.trigger_words))}) "
              f"in {time.perf_counter() - started:.1f}s (kept in {cache})")
    if every_step:  # the trainer encodes with the VAE: keep it on the device
        components.vae.to(device)
    samples = None
    if prompts or args.samples_out:
        prompts = prompts or list(dict.fromkeys(r.caption for r in report.records))[:4]
        samples = BeforeAfter(args, components, prompts, resolution)
        samples.before = samples.render(device)  # the pretrained model: no LoRA exists yet
    trainer = AptTrainer(
        DiffusersSDXLBackbone.from_components(components), dataset, config, checkpoint_dir=checkpoints,
        on_event=lambda e: print(format_event(e), flush=True)
        if e.step % args.print_every == 0 or e.step == e.total_steps else None,
        encode_pixels=lambda px: encode_pixels(components, px), data_fingerprint=records_fingerprint(report.records))
    if args.resume:
        print(f"resuming at step {trainer.resume()} from {checkpoints}")
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: (print("\nstopping after this step..."),
                                                        interrupted.append(1), trainer.request_stop()))
    try:
        result = trainer.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    path = trainer.save_lora(out, save_dtype=args.save_dtype)
    state = "stopped early" if result.stopped else "finished"
    print(f"{state} at step {result.steps_done}; LoRA written to {path}")
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint} (continue with --resume)")
    print("final gamma per bin:", " ".join(f"{g:.2f}" for g in result.gammas))
    if samples is not None:
        after = samples.render(device)  # LoRA on, same prompts and seeds
        grid = Path(args.samples_out) if args.samples_out else out.with_suffix(".before_after.png")
        method = "DreamBooth-LoRA (--baseline)" if args.baseline else "APT LoRA"
        title = (f"{components.name}: {method} rank {args.rank}, {result.steps_done} steps, lr {args.lr:g}; "
                 f"DDIM {args.sample_steps}, cfg {args.cfg:g}")
        print(f"before/after grid written to {samples.write(after, grid, title, report.records)}")
    return 130 if interrupted else 0  # the shell's code for Ctrl-C, after everything was saved


if __name__ == "__main__":
    sys.exit(main())
