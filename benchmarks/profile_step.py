"""Where the APT step's extra time goes, on the tiny model (CPU; also runs on CUDA).

    python -m benchmarks.profile_step [--device cpu] [--model tiny] [--resolution 256] [--rank 32]
        [--steps 10] [--warmup 3] [--threads 1] [--profile-steps 3] [--json out.json]

Two parts, both in one process:

1. Ablation timings (one UNet copy per configuration, steps round-robin): DreamBooth, DreamBooth +
   prior forward, APT, and APT with one part switched off at a time. The differences of medians
   say what each part costs: prior forward, attention alignment (explicit attention + AA loss),
   representation stabilisation (hook + statistics + RS loss), adaptive augmentation / loss weight.

2. torch.profiler on --profile-steps steps of DreamBooth and of APT, with labelled regions
   (record_function) wrapped around the trainer's pieces *in this process only* (apt_core is not
   modified): prior forward, fine-tuned forward, backward, optimizer, peft LoRA layers, the
   recording cross-attention processor, RS/AA losses, augmentation, indicator update. Reports
   per step: inclusive time per region, number of aten ops, time inside aten ops vs outside
   (Python + framework), and the top ops by self time. The labels add a little overhead of their
   own (a few microseconds per wrapped call), so the ablation timings are the numbers to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import shlex
import statistics
import sys
from collections import defaultdict
from typing import Any

import torch

from .common import machine_info, machine_name, make_workload, summarize, timed

ABLATIONS = {
    # name: AptSwitches kwargs (adaptive_augmentation, adaptive_loss_weight, RS, AA, track_indicator)
    "dreambooth": (False, False, False, False, False),
    "dreambooth_prior": (False, False, False, False, True),
    "apt": (True, True, True, True, False),
    "apt_no_aa": (True, True, True, False, False),
    "apt_no_rs": (True, True, False, True, False),
    "apt_no_ata": (False, False, True, True, False),  # RS + AA only (prior forward still runs)
}


def make_trainer(w, unet, switches: tuple, gc: bool = False):
    from apt_core.backbone import DiffusersSDXLBackbone
    from apt_core.config import AptConfig, AptSwitches, LoraConfig, TrainConfig
    from apt_core.trainer import AptTrainer

    cfg = AptConfig(train=TrainConfig(steps=10**9, batch_size=w.batch_size, learning_rate=1e-4,
                                      checkpoint_every=0, gradient_checkpointing=gc, seed=w.seed),
                    lora=LoraConfig(rank=w.rank, alpha=float(w.rank)),
                    switches=AptSwitches(*switches))
    return AptTrainer(DiffusersSDXLBackbone(unet, w.alphas_cumprod), w.dataset, cfg)


def ablation(w, steps: int, warmup: int) -> dict[str, dict[str, float]]:
    trainers = {name: make_trainer(w, w.fresh_unet(), sw) for name, sw in ABLATIONS.items()}
    times: dict[str, list[float]] = defaultdict(list)
    order = random.Random(0)
    try:
        for i in range(warmup + steps):
            for name in order.sample(list(trainers), len(trainers)):  # no position bias
                t = timed(trainers[name].train_step, w.device)
                if i >= warmup:
                    times[name].append(t)
    finally:
        for tr in trainers.values():
            tr.close()
    return {name: summarize(ts) for name, ts in times.items()}


# ------------------------------------------------------------------------------ labelled regions

LABELS = {"unet forward: prior (no grad)", "unet forward: fine-tuned", "backward"}


def _label(fn, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    LABELS.add(name)
    return wrapper


@contextlib.contextmanager
def labelled_regions():
    """record_function ranges around the pieces of a step (patched on the classes, undone after)."""
    import peft.tuners.lora.layer as peft_lora
    from diffusers.models.attention_processor import AttnProcessor2_0

    from apt_core import backbone, lora, probes, trainer

    patches = []

    def patch(owner, attr, make):
        original = getattr(owner, attr)
        setattr(owner, attr, make(original))
        patches.append((owner, attr, original))

    def forward_label(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            name = "unet forward: prior (no grad)" if not torch.is_grad_enabled() else "unet forward: fine-tuned"
            with torch.profiler.record_function(name):
                return fn(self, *args, **kwargs)
        return wrapper

    def backward_label(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            with torch.profiler.record_function("backward"):
                return fn(self, *args, **kwargs)
        return wrapper

    patch(trainer.AptTrainer, "_forward", forward_label)
    patch(torch.Tensor, "backward", backward_label)
    patch(torch.nn.utils, "clip_grad_norm_", lambda f: _label(f, "clip_grad_norm_"))
    patch(trainer, "augment_batch", lambda f: _label(f, "adaptive augmentation"))
    patch(trainer.OverfittingIndicator, "update", lambda f: _label(f, "indicator update"))
    patch(trainer.AptTrainer, "_event", lambda f: _label(f, "progress event"))
    patch(probes.AptProbe, "losses", lambda f: _label(f, "RS/AA losses"))
    patch(probes.AptProbe, "record_features", lambda f: _label(f, "RS hook (record_features)"))
    patch(backbone.RecordingCrossAttnProcessor, "__call__",
          lambda f: _label(f, "recording cross-attn processor"))
    patch(AttnProcessor2_0, "__call__", lambda f: _label(f, "diffusers fused attention processor (SDPA)"))
    patch(peft_lora.Linear, "forward", lambda f: _label(f, "peft lora.Linear.forward"))
    patch(lora.LoraAdapter, "set_enabled", lambda f: _label(f, "LoRA on/off switch"))
    try:
        yield
    finally:
        for owner, attr, original in reversed(patches):
            setattr(owner, attr, original)


def region_times(events, steps: int) -> dict[str, dict[str, float]]:
    """Per-step times of the labelled regions from `prof.key_averages()`.

    On CUDA a region shows up twice under its label: the CPU-side range (its CPU time, and the
    kernel time of the ops launched inside it as device time) and a GPU-timeline annotation
    (no CPU time; its device time is the span from first to last kernel, gaps included). The
    CPU-side entry is the one to read; the annotation is only used when nothing else is there.
    """
    regions: dict[str, dict[str, float]] = {}
    for e in events:
        if e.key not in LABELS and not e.key.startswith("Optimizer.step"):
            continue
        if e.key in regions and e.cpu_time_total == 0:
            continue  # a GPU annotation after the CPU-side entry
        regions[e.key] = {"per_step_ms": e.cpu_time_total / 1000 / steps, "calls_per_step": e.count / steps,
                          "device_ms_per_step": getattr(e, "device_time_total", 0.0) / 1000 / steps}
    return regions


def profile_trainer(w, switches: tuple, steps: int, warmup: int, row_limit: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    tr = make_trainer(w, w.fresh_unet(), switches)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.device.type == "cuda" else [])
    try:
        with labelled_regions():
            for _ in range(warmup):
                tr.train_step()
            walls = []
            with profile(activities=activities, record_shapes=False) as prof:
                for _ in range(steps):
                    walls.append(timed(tr.train_step, w.device))
    finally:
        tr.close()
    events = prof.key_averages()
    aten_self_us = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::"))
    regions = region_times(events, steps)
    # Ops issued from Python or the autograd engine (not those an op calls internally): on a GPU
    # each is at least one kernel launch, so this count bounds how fast the CPU can feed the GPU.
    top_level_ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    wall_ms = statistics.median(walls) * 1000
    total_wall_ms = sum(walls) * 1000
    top = sorted((e for e in events if e.key.startswith("aten::")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    return {
        "wall_ms_median": wall_ms,
        "aten_ops_per_step": top_level_ops / steps,
        "aten_self_ms_per_step": aten_self_us / 1000 / steps,
        # Time the GPU spent running kernels (0 on CPU): wall minus this is the GPU waiting for
        # the CPU to issue work.
        "gpu_kernel_ms_per_step": sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1000 / steps,
        "outside_aten_ms_per_step": (total_wall_ms - aten_self_us / 1000) / steps,
        "regions": dict(sorted(regions.items(), key=lambda kv: -kv[1]["per_step_ms"])),
        "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                     "calls_per_step": e.count / steps} for e in top],
        "table": events.table(sort_by="self_cpu_time_total", row_limit=row_limit),
    }


def peft_layer_overhead(device: torch.device, dtype: torch.dtype, amp: torch.dtype | None,
                        tokens: int, width: int, rank: int, calls: int = 300) -> dict[str, float]:
    """Per-call cost of one LoRA-wrapped nn.Linear (peft, as the project injects it: fp32 LoRA
    weights) against the bare nn.Linear; input (1, tokens, width) in `dtype`, autocast `amp`.

    Median over 5 rounds of `calls` calls (GPU synchronised once per round), in microseconds per
    call. With small shapes this is the CPU cost of issuing the layer (what limits a launch-bound
    GPU step); with real shapes on a GPU it includes the kernels. Forward + backward rows use an
    input that requires grad, as inside the UNet. "no input cast" sets peft's
    `cast_input_dtype_enabled = False` (its documented switch): under autocast the fp32 copy of
    the activation that peft makes for the fp32 LoRA weights is then skipped.
    """
    import peft
    from torch import nn

    with torch.device(device):
        base = nn.Linear(width, width).to(dtype)
        x = torch.randn(1, tokens, width, dtype=dtype)
    base.requires_grad_(False)
    xg = x.clone().requires_grad_(True)

    def bench(layer, grad: bool) -> float:
        def run():
            with torch.set_grad_enabled(grad), torch.autocast(
                    device.type, dtype=amp or torch.float32, enabled=amp is not None):
                for _ in range(calls):
                    if grad:
                        layer(xg).float().mean().backward()
                    else:
                        layer(x)
        rounds = [timed(run, device) for _ in range(6)]
        return statistics.median(rounds[1:]) / calls * 1e6

    out = {"plain nn.Linear, no grad": bench(base, False),
           "plain nn.Linear, forward + backward": bench(base, True)}
    model = nn.Sequential(base)
    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]), model)
    layer = model[0]
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    layer._disable_adapters = True
    out["peft LoRA off, no grad (the prior pass)"] = bench(layer, False)
    layer._disable_adapters = False
    out["peft LoRA on, no grad"] = bench(layer, False)
    out["peft LoRA on, forward + backward"] = bench(layer, True)
    if amp is not None:
        layer.cast_input_dtype_enabled = False
        out["peft LoRA on, forward + backward, no input cast"] = bench(layer, True)
    return out


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"## APT step profile: {s['model']} {s['resolution']}², rank {s['rank']}, {s['device']}",
             "", f"- machine: {machine_name(result['machine'])}",
             f"- command: `{result['command']}`", "",
             "| configuration | median ms | min ms | median vs DreamBooth | median vs DreamBooth + prior |",
             "|---|---|---|---|---|"]
    ab = result["ablation"]
    db, dbp = ab["dreambooth"]["median_ms"], ab["dreambooth_prior"]["median_ms"]
    for name, st in ab.items():
        lines.append(f"| {name} | {st['median_ms']:.1f} | {st['min_ms']:.1f} | {st['median_ms'] - db:+.1f} ms | "
                     f"{st['median_ms'] - dbp:+.1f} ms |")

    def part(a, b):
        return (f"{ab[a]['median_ms'] - ab[b]['median_ms']:.1f} | "
                f"{ab[a]['min_ms'] - ab[b]['min_ms']:.1f} |")

    lines += ["", "| part of APT (difference of two configurations) | median ms | min ms |", "|---|---|---|",
              f"| prior forward (DreamBooth + prior − DreamBooth) | {part('dreambooth_prior', 'dreambooth')}",
              f"| attention alignment (APT − APT without AA) | {part('apt', 'apt_no_aa')}",
              f"| representation stabilisation (APT − APT without RS) | {part('apt', 'apt_no_rs')}",
              f"| augmentation + loss weight (APT − RS/AA only) | {part('apt', 'apt_no_ata')}",
              f"| all hooks/losses/augmentation (APT − DreamBooth + prior) | {part('apt', 'dreambooth_prior')}",
              "", "Differences smaller than the spread of the rows (min vs median) are noise; on a busy "
              "CPU the labelled regions below are the steadier measure."]
    lines += ["", "| profiled (per step) | DreamBooth | APT |", "|---|---|---|"]
    p_db, p_apt = result["profile"]["dreambooth"], result["profile"]["apt"]
    for key, label in (("wall_ms_median", "wall ms (profiler on)"), ("aten_ops_per_step", "aten ops issued (top-level)"),
                       ("aten_self_ms_per_step", "ms inside aten ops"),
                       ("outside_aten_ms_per_step", "ms outside aten ops (Python, autograd engine, hooks)"),
                       ("gpu_kernel_ms_per_step", "ms of GPU kernels (0 on CPU)")):
        lines.append(f"| {label} | {p_db[key]:.1f} | {p_apt[key]:.1f} |")
    names = list(dict.fromkeys(list(p_apt["regions"]) + list(p_db["regions"])))
    gpu = s["device"] == "cuda"
    lines += ["", "| labelled region (inclusive, per step) | DreamBooth CPU ms | APT CPU ms | APT calls |"
              + (" DreamBooth GPU ms | APT GPU ms |" if gpu else ""),
              "|---|---|---|---|" + ("---|---|" if gpu else "")]

    def cell(r, key, fmt="{:.1f}"):
        return fmt.format(r[key]) if r else ""

    for n in names:
        a, d = p_apt["regions"].get(n), p_db["regions"].get(n)
        line = f"| {n} | {cell(d, 'per_step_ms')} | {cell(a, 'per_step_ms')} | {cell(a, 'calls_per_step', '{:.0f}')} |"
        if gpu:
            line += f" {cell(d, 'device_ms_per_step')} | {cell(a, 'device_ms_per_step')} |"
        lines.append(line)
    for title, table in result.get("peft_layer", {}).items():
        lines += ["", f"| one LoRA layer, {title} | µs per call |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in table.items()]
    lines += ["", "Top aten ops by self time, APT step:", "", "| op | self ms/step | calls/step |", "|---|---|---|"]
    for op in p_apt["top_ops"]:
        lines.append(f"| {op['op']} | {op['self_ms_per_step']:.2f} | {op['calls_per_step']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=("tiny", "sdxl"), help="default: sdxl on cuda, tiny on cpu")
    p.add_argument("--resolution", type=int)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--row-limit", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args(argv)
    args.model = args.model or ("sdxl" if args.device == "cuda" else "tiny")
    resolution = args.resolution or (1024 if args.model == "sdxl" else 256)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        w = make_workload(args.model, device, resolution, 1, args.rank)
        result = {"command": "python -m benchmarks.profile_step " + shlex.join(argv),
                  "machine": machine_info(device),
                  "settings": {"device": args.device, "model": args.model, "resolution": resolution,
                               "rank": args.rank, "steps": args.steps, "warmup": args.warmup}}
        result["ablation"] = ablation(w, args.steps, args.warmup)
        amp = w.amp_dtype
        shapes = {"tiny shapes (1, 64, 64), rank 8: per-call overhead": (64, 64, 8)}
        if args.model == "sdxl":
            shapes["SDXL up_blocks.1 self-attention (1, 4096, 640), rank 32"] = (4096, 640, 32)
            shapes["SDXL up_blocks.0 self-attention (1, 1024, 1280), rank 32"] = (1024, 1280, 32)
        result["peft_layer"] = {title: peft_layer_overhead(device, w.dtype, amp, *shape)
                                for title, shape in shapes.items()}
        result["profile"] = {
            name: profile_trainer(w, ABLATIONS[name], args.profile_steps, args.warmup, args.row_limit)
            for name in ("dreambooth", "apt")}
    finally:
        torch.set_num_threads(threads)
    md = to_markdown(result)
    print(md)
    print("\nprofiler table, APT step:\n" + result["profile"]["apt"]["table"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**result, "markdown": md}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
