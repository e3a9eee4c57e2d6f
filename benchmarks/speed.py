"""One APT training step, timed side by side with the alternatives, in one process.

    python -m benchmarks.speed [--device cuda|cpu] [--model sdxl|tiny] [--resolution 1024]
        [--rank 32] [--steps 10] [--warmup 3] [--gradient-checkpointing both|on|off] [--compile]
        [--json out.json]

Rows (see benchmarks/README.md): this project's DreamBooth-LoRA step, DreamBooth step + prior
forward, full APT step; the naive diffusers UNet + peft path (LoRA step, and LoRA step + prior
forward with the adapter disabled); ComfyUI's TrainLoraNode; three no-grad forward references.
Each: median of --steps timed steps after --warmup warm-ups (torch.cuda.synchronize() around each
step on GPU), peak memory (GPU: max_memory_allocated, reset per variant; CPU: peak RSS delta).
Prints a markdown report (machine, versions, command, rows, ratios, targets, one-off costs) and
writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .common import (MemoryProbe, Workload, free_memory, import_comfy_host, machine_info,
                     machine_name, make_workload, summarize, sync, time_caching, timed)

GIB = 2**30

# ------------------------------------------------------------------------------ the variants


@dataclass(frozen=True)
class Spec:
    id: str
    label: str
    family: str  # "project" | "naive" | "comfy" | "reference"
    kind: str  # "step" | "forward"
    gc: bool | None  # gradient checkpointing; None: not applicable (no-grad forward)

    @property
    def key(self) -> str:
        return self.id if self.gc is None else f"{self.id}@gc_{'on' if self.gc else 'off'}"


ROWS: dict[str, tuple[str, str, str]] = {
    # id: (label, family, kind)
    "forward_plain_noamp": ("reference: no-grad forward, plain UNet, weights' dtype, autocast off "
                            "(performance.md's 'plain bf16 forward')", "reference", "forward"),
    "forward_plain": ("reference: no-grad forward, plain UNet (no adapter), trainer's autocast",
                      "reference", "forward"),
    "forward_lora_off": ("reference: no-grad forward, project LoRA injected but off (= APT's prior forward)",
                         "project", "forward"),
    "dreambooth": ("project: DreamBooth-LoRA step (AptSwitches.baseline())", "project", "step"),
    "dreambooth_prior": ("project: DreamBooth step + prior forward (no hooks, no RS/AA/augment)",
                         "project", "step"),
    "apt": ("project: full APT step (ATA augment + loss weight, RS + AA hooks)", "project", "step"),
    "naive_dreambooth": ("naive: diffusers UNet + peft add_adapter, eager LoRA step", "naive", "step"),
    "naive_prior": ("naive: diffusers+peft LoRA step + prior forward (adapter disabled) = baseline",
                    "naive", "step"),
    "comfy": ("ComfyUI TrainLoraNode (native), one training step", "comfy", "step"),
}
STEP_ROWS = [k for k, v in ROWS.items() if v[2] == "step"]


def make_specs(variants: list[str], gc_modes: list[bool]) -> list[Spec]:
    specs = []
    for vid in variants:
        label, family, kind = ROWS[vid]
        if kind == "forward":
            specs.append(Spec(vid, label, family, kind, None))
        else:
            specs += [Spec(vid, label, family, kind, gc) for gc in gc_modes]
    return specs


def _device_inputs(w: Workload, idx: list[int]):
    from apt_core.conditioning import SDXLConditioning

    ex = [w.dataset.examples[i] for i in idx]
    latents = torch.stack([e.latent for e in ex]).to(w.device, torch.float32)
    cond = SDXLConditioning.cat([e.cond for e in ex]).to(w.device, w.dtype)
    return latents, cond


def _unet_kwargs(cond) -> dict[str, Any]:
    return dict(encoder_hidden_states=cond.context, return_dict=False,
                added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids})


def _autocast(w: Workload, enabled: bool = True):
    amp = w.amp_dtype
    return torch.autocast(w.device.type, dtype=amp or torch.float32, enabled=enabled and amp is not None)


class ProjectStep:
    """`AptTrainer.train_step()` of this project, switches chosen by the row."""

    def __init__(self, w: Workload, unet, spec: Spec):
        from apt_core.backbone import DiffusersSDXLBackbone
        from apt_core.config import AptConfig, AptSwitches, LoraConfig, TrainConfig
        from apt_core.trainer import AptTrainer

        switches = {"dreambooth": AptSwitches.baseline(),
                    "dreambooth_prior": AptSwitches(False, False, False, False, track_indicator=True),
                    "apt": AptSwitches()}[spec.id]
        cfg = AptConfig(train=TrainConfig(steps=10**9, batch_size=w.batch_size, learning_rate=1e-4,
                                          checkpoint_every=0, gradient_checkpointing=bool(spec.gc),
                                          seed=w.seed),
                        lora=LoraConfig(rank=w.rank, alpha=float(w.rank)), switches=switches)
        self.trainer = AptTrainer(DiffusersSDXLBackbone(unet, w.alphas_cumprod), w.dataset, cfg)
        self.last = None

    def step(self) -> None:
        self.last = self.trainer.train_step()

    def notes(self) -> dict[str, Any]:
        e = self.last
        if e is None:
            return {}
        return {"loss": round(e.loss, 5), "aug_rate": round(e.aug_rate, 3),
                "gamma_max": round(max(e.gamma), 3)}

    def close(self) -> None:
        self.trainer.close()
        self.trainer = None


class ForwardOnly:
    """One no-grad forward under the trainer's autocast; with `lora`, the project's LoRA layers are
    injected and switched off exactly as in APT's prior pass."""

    def __init__(self, w: Workload, unet, spec: Spec):
        from apt_core.backbone import DiffusersSDXLBackbone
        from apt_core.config import LoraConfig
        from apt_core.lora import LoraAdapter

        self.w, self.unet, self.lora = w, unet, None
        self.amp = spec.id != "forward_plain_noamp"
        if spec.id == "forward_lora_off":
            targets = DiffusersSDXLBackbone(unet, w.alphas_cumprod).lora_target_names(False)
            self.lora = LoraAdapter(unet, targets, LoraConfig(rank=w.rank, alpha=float(w.rank)), seed=w.seed)
            self.lora.set_enabled(False)
        latents, self.cond = _device_inputs(w, list(range(w.batch_size)))
        self.x = torch.randn_like(latents).to(w.dtype)
        self.t = torch.full((w.batch_size,), 500, device=w.device, dtype=torch.long)

    def step(self) -> None:
        with torch.no_grad(), _autocast(self.w, enabled=self.amp):
            self.unet(self.x, self.t, **_unet_kwargs(self.cond))

    def notes(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        if self.lora is not None:
            self.lora.set_enabled(True)
            self.lora.remove()


NAIVE_ADAPTER = "naive"


class NaiveStep:
    """The obvious implementation (docs/performance.md baseline): diffusers' UNet with
    `unet.add_adapter(peft.LoraConfig(...))` as in diffusers' train_dreambooth_lora_sdxl.py, LoRA
    params cast to fp32, autocast, SDPA attention, (fused on GPU) AdamW, grad clipping; with
    `prior`, one extra no-grad forward with `unet.disable_adapters()` / `enable_adapters()`."""

    def __init__(self, w: Workload, unet, spec: Spec):
        from peft import LoraConfig

        self.w, self.unet, self.prior, self.gc = w, unet, spec.id == "naive_prior", bool(spec.gc)
        unet.add_adapter(LoraConfig(r=w.rank, lora_alpha=w.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]),
                         adapter_name=NAIVE_ADAPTER)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()  # diffusers' cast_training_params(unet, dtype=torch.float32)
        if self.gc:
            unet.enable_gradient_checkpointing()
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-4,
                                     fused=True if w.device.type == "cuda" else None)
        self.g = torch.Generator().manual_seed(w.seed)
        self.acp = w.alphas_cumprod.to(w.device)
        self.loss = None

    def step(self) -> None:
        w, unet = self.w, self.unet
        b = w.batch_size
        idx = torch.randint(len(w.dataset), (b,), generator=self.g).tolist()
        latents, cond = _device_inputs(w, idx)
        noise = torch.randn(latents.shape, generator=self.g).to(w.device)
        t = torch.randint(0, 1000, (b,), generator=self.g).to(w.device)
        acp = self.acp[t].view(b, 1, 1, 1)
        x_t = (acp.sqrt() * latents + (1.0 - acp).sqrt() * noise).to(w.dtype)
        kwargs = _unet_kwargs(cond)
        with _autocast(w):
            if self.prior:
                with torch.no_grad():
                    unet.disable_adapters()
                    pred_pre = unet(x_t, t, **kwargs)[0]
                    unet.enable_adapters()
            pred = unet(x_t, t, **kwargs)[0]
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.item()  # every trainer logs the loss
        if self.prior:
            F.mse_loss(pred_pre.float(), noise).item()

    def notes(self) -> dict[str, Any]:
        return {"loss": round(self.loss, 5)} if self.loss is not None else {}

    def close(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        unet = self.unet
        if self.gc:
            unet.disable_gradient_checkpointing()
        for name, module in list(unet.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = unet.get_submodule(parent_name) if parent_name else unet
                setattr(parent, child, module.get_base_layer())
        if hasattr(unet, "peft_config"):
            del unet.peft_config
        unet._hf_peft_config_loaded = False
        unet.requires_grad_(False)
        self.opt = self.params = None


RUNNERS: dict[str, Callable] = {
    "forward_plain_noamp": ForwardOnly, "forward_plain": ForwardOnly, "forward_lora_off": ForwardOnly,
    "dreambooth": ProjectStep, "dreambooth_prior": ProjectStep, "apt": ProjectStep,
    "naive_dreambooth": NaiveStep, "naive_prior": NaiveStep,
}


def dirty_reasons(unet) -> list[str]:
    """What a variant left behind on the shared UNet (must be nothing)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for name, m in unet.named_modules():
        if isinstance(m, BaseTunerLayer):
            out.append(f"LoRA layer {name}")
        if m._forward_hooks or m._forward_pre_hooks:
            out.append(f"hook on {name}")
        if getattr(m, "gradient_checkpointing", False):
            out.append(f"gradient checkpointing on {name}")
        proc = getattr(m, "processor", None)
        if proc is not None and type(proc) is not AttnProcessor2_0:
            out.append(f"processor {type(proc).__name__} on {name}")
    if any(p.requires_grad for p in unet.parameters()):
        out.append("trainable base parameters")
    if getattr(unet, "_compiled_call_impl", None) is not None:
        out.append("still compiled")
    return out[:5]


# ------------------------------------------------------------------------------ running


@dataclass
class Options:
    steps: int
    warmup: int
    compile: bool
    flops: bool
    compile_mode: str = "default"


def _compile_config() -> dict[str, Any]:
    """Raise dynamo's recompile limits: every variant (and prior/fine-tuned pass) is its own graph."""
    import torch._dynamo

    saved = {}
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            saved[name] = getattr(torch._dynamo.config, name)
            setattr(torch._dynamo.config, name, max(256, int(saved[name] or 0)))
    return saved


def _restore_compile_config(saved: dict[str, Any]) -> None:
    import torch._dynamo

    for name, value in saved.items():
        setattr(torch._dynamo.config, name, value)


def _graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:
        return -1


class OpCounter:
    """Counts ATen ops reaching the backend (forward, backward and optimizer; after autograd and
    autocast): `ops` all of them, `kernels` those that are not views. On a GPU each non-view op is
    at least one kernel launch (fused optimizers excepted), so `kernels` x the per-launch CPU cost
    bounds how fast an eager step can be issued, whatever the GPU."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                if not getattr(func, "is_view", False):
                    counter.kernels += 1
                return func(*args, **(kwargs or {}))

        self.ops = self.kernels = 0
        self.mode = _Mode()


def _count_work(runner) -> dict[str, float]:
    """FLOPs (torch.utils.flop_counter) and ATen op counts of one more step."""
    from torch.utils.flop_counter import FlopCounterMode

    ops = OpCounter()
    with FlopCounterMode(display=False) as flops, ops.mode:
        runner.step()
    return {"flops": float(flops.get_total_flops()), "aten_ops": ops.ops, "aten_non_view_ops": ops.kernels}


def _store_work(row: dict[str, Any], work: dict[str, float]) -> None:
    row["flops"] = work["flops"]
    row["notes"]["aten_ops"] = work["aten_ops"]
    row["notes"]["non_view_ops"] = work["aten_non_view_ops"]


def _uncompile(unet) -> None:
    if getattr(unet, "_compiled_call_impl", None) is not None:
        unet._compiled_call_impl = None


def _base_row(spec: Spec, compiled: bool) -> dict[str, Any]:
    return {"key": spec.key, "id": spec.id, "label": spec.label, "family": spec.family,
            "kind": spec.kind, "gradient_checkpointing": spec.gc, "compiled": compiled,
            "status": "not_run", "reason": None, "times_ms": [], "setup_s": None,
            "compile_s": None, "flops": None, "memory": {}, "notes": {}}


def _finish_row(row: dict[str, Any], times: list[float], warm: list[float], opts: Options) -> None:
    row["times_ms"] = [t * 1000 for t in times]
    row["warmup_ms"] = [t * 1000 for t in warm]
    row.update(summarize(times))
    if row["compiled"] and warm:
        # Compilation happens in the warm-up steps: what they took beyond steady-state steps.
        row["compile_s"] = max(0.0, sum(warm) - len(warm) * row["median_ms"] / 1000)
    row["status"] = "ok"


def _error(row: dict[str, Any], exc: BaseException) -> None:
    row["status"] = "error"
    row["reason"] = f"{type(exc).__name__}: {exc}"[:500]
    print(f"[benchmarks.speed] {row['key']} failed:", file=sys.stderr)
    traceback.print_exc()


def _prepare(w: Workload, unet, spec: Spec, row: dict[str, Any], compiled: bool, opts: Options):
    """The variant's runner on `unet`; its setup time goes into row["setup_s"]; compiles the UNet
    afterwards when asked (compile time then shows in the warm-up steps)."""
    t0 = time.perf_counter()
    runner = RUNNERS[spec.id](w, unet, spec)
    sync(w.device)
    row["setup_s"] = time.perf_counter() - t0
    if compiled:
        unet.compile(mode=opts.compile_mode)
    return runner


def run_sequential(w: Workload, specs: list[Spec], opts: Options, log) -> list[dict[str, Any]]:
    """One variant after the other on one shared UNet; each leaves it exactly as it found it."""
    rows = []
    mem = MemoryProbe(w.device)
    for spec in specs:
        compiled = opts.compile and spec.family in ("project", "reference")
        row = _base_row(spec, compiled)
        rows.append(row)
        runner = None
        unet = w.base_unet()
        try:
            mem.reset()
            if compiled:
                import torch._dynamo

                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
            runner = _prepare(w, unet, spec, row, compiled, opts)
            warm = [timed(runner.step, w.device) for _ in range(opts.warmup)]
            times = [timed(runner.step, w.device) for _ in range(opts.steps)]
            _finish_row(row, times, warm, opts)
            row["memory"] = mem.read()
            if compiled:
                row["notes"]["graph_breaks"] = _graph_breaks()
            if opts.flops and not compiled:
                _store_work(row, _count_work(runner))
            row["notes"].update(runner.notes())
        except Exception as exc:  # one broken variant must not hide the others
            _error(row, exc)
        finally:
            _uncompile(unet)
            if runner is not None:
                try:
                    runner.close()
                except Exception as exc:
                    print(f"[benchmarks.speed] closing {spec.key} failed: {exc!r}", file=sys.stderr)
            runner = None
            if compiled:
                import torch._dynamo

                torch._dynamo.reset()
            dirty = dirty_reasons(unet)
            if dirty:
                row["notes"]["left_unet_dirty"] = dirty
                print(f"[benchmarks.speed] {spec.key} left the UNet dirty ({dirty}); rebuilding it",
                      file=sys.stderr)
                w.replace_base_unet()
            del unet
            free_memory(w.device)
        log(row)
    return rows


def run_interleaved(w: Workload, specs: list[Spec], opts: Options, log) -> list[dict[str, Any]]:
    """Every variant on its own copy of the UNet, steps taken round-robin (warm-ups first, the
    order shuffled every round), so load from other processes on a shared machine hits every
    variant alike. No per-variant memory."""
    rows, live = [], []
    for spec in specs:
        compiled = opts.compile and spec.family in ("project", "reference")
        row = _base_row(spec, compiled)
        rows.append(row)
        try:
            unet = w.fresh_unet()
            runner = _prepare(w, unet, spec, row, compiled, opts)
            live.append((row, runner, unet, [], []))
        except Exception as exc:
            _error(row, exc)
    order = random.Random(0)
    for phase, count in (("warm", opts.warmup), ("timed", opts.steps)):
        for _ in range(count):
            for item in order.sample(live, len(live)):  # a fresh order each round: no position bias
                row, runner = item[0], item[1]
                try:
                    item[3 if phase == "warm" else 4].append(timed(runner.step, w.device))
                except Exception as exc:
                    _error(row, exc)
                    live.remove(item)
    for row, runner, unet, warm, times in live:
        try:
            _finish_row(row, times, warm, opts)
            row["memory"] = {"memory_kind": None, "why": "interleaved schedule: not per variant"}
            if opts.flops and not row["compiled"]:
                _store_work(row, _count_work(runner))
            row["notes"].update(runner.notes())
        except Exception as exc:
            _error(row, exc)
    for row, runner, unet, *_ in live:
        _uncompile(unet)
        try:
            runner.close()
        except Exception:
            pass
        log(row)
    if opts.compile:
        import torch._dynamo

        torch._dynamo.reset()
    free_memory(w.device)
    return rows


def run_comfy(w: Workload, spec: Spec, opts: Options, source_unet) -> dict[str, Any]:
    """ComfyUI's own TrainLoraNode.execute on a ComfyUI SDXL model of the same architecture
    (built by tests/comfy_host.py from the diffusers config, weights copied from `source_unet`).

    Step time = interval between consecutive loss callbacks (optimizer step + forward + backward +
    loss.item()); the node runs warmup + steps + 1 steps in one call, the first `warmup` intervals
    are dropped. Node settings: its defaults (AdamW, MSE, algorithm LoRA, lora_dtype bf16 on GPU)
    except rank, gradient checkpointing (per row) and training_dtype (bf16 on GPU, fp32 on CPU).
    NOTE: the node trains a LoRA on *every* >= 2-D weight (convs, all linears) plus a diff of every
    bias and norm weight: more trainable tensors than the attention-only LoRA of the other rows.
    """
    row = _base_row(spec, False)
    comfy_host = import_comfy_host()
    if not comfy_host.comfyui_available():
        row["status"] = "not_measured"
        row["reason"] = (f"ComfyUI tree not found at {comfy_host.comfyui_dir()} "
                         "(bash scripts/fetch_comfyui.sh, or set APT_COMFYUI_DIR)")
        return row
    mem = MemoryProbe(w.device)
    mp = None
    try:
        comfy_host.import_comfy(cpu=w.device.type == "cpu")
        import comfy.model_management as mm
        import comfy.utils
        import comfy_extras.nodes_train as nodes_train

        comfy.utils.PROGRESS_BAR_ENABLED = False
        mem.reset()
        t0 = time.perf_counter()
        def load(disable_dynamic=False):  # what ComfyUI's checkpoint loader registers (cached_patcher_init)
            patcher = comfy_host.comfy_sdxl_model_from_diffusers_config(w.unet_config, dtype=w.dtype, device=w.device)
            comfy_host.load_diffusers_unet_into_comfy(source_unet, patcher)
            return patcher

        mp = load()
        mp.cached_patcher_init = (load, ())  # v0.33's node trains on a fresh load of the model (force_deepcopy)
        sync(w.device)
        row["setup_s"] = time.perf_counter() - t0

        # One LATENT per image: ComfyUI 0.3.75's node raises UnboundLocalError ('multi_res') when
        # given a single latent batch, so the images go in as a list (the node concatenates them).
        latents = [{"samples": ex.latent[None].float()} for ex in w.dataset.examples]
        res = w.resolution
        positive = [[ex.cond.context.float(), {
            "pooled_output": ex.cond.pooled.float(), "width": res, "height": res, "crop_w": 0,
            "crop_h": 0, "target_width": res, "target_height": res}] for ex in w.dataset.examples]
        stamps: list[float] = []
        base_sampler = nodes_train.TrainSampler

        class TimedSampler(base_sampler):
            def __init__(self, *args, loss_callback=None, **kwargs):
                def callback(loss):
                    stamps.append(time.perf_counter())  # after loss.item(): the GPU is synchronised
                    if loss_callback:
                        loss_callback(loss)

                super().__init__(*args, loss_callback=callback, **kwargs)

        gpu = w.device.type == "cuda"
        total = opts.warmup + opts.steps + 1
        nodes_train.TrainSampler = TimedSampler
        try:
            with warnings.catch_warnings():  # "In CPU autocast, but the target dtype is not supported"
                warnings.filterwarnings("ignore", message="In CPU autocast")
                args = dict(
                    model=[mp], latents=latents, positive=[positive], batch_size=[w.batch_size],
                    grad_accumulation_steps=[1], steps=[total], learning_rate=[1e-4], rank=[w.rank],
                    optimizer=["AdamW"], loss_function=["MSE"], seed=[w.seed],
                    training_dtype=["bf16" if gpu else "fp32"], lora_dtype=["bf16" if gpu else "fp32"],
                    algorithm=["LoRA"], gradient_checkpointing=[bool(spec.gc)], existing_lora=["[None]"])
                out = nodes_train.TrainLoraNode.execute(**_with_schema_defaults(nodes_train.TrainLoraNode, args))
        finally:
            nodes_train.TrainSampler = base_sampler
        sync(w.device)
        intervals = [b - a for a, b in zip(stamps, stamps[1:])]
        if len(intervals) != total - 1:
            raise RuntimeError(f"expected {total - 1} step intervals, got {len(intervals)}")
        _finish_row(row, intervals[opts.warmup:], intervals[:opts.warmup], opts)
        row["memory"] = mem.read()
        outputs = out.args if hasattr(out, "args") else out  # 0.3.75: (model, lora, ...); v0.33: (lora, ...)
        lora = next(o for o in outputs if isinstance(o, dict) and o and all(torch.is_tensor(v) for v in o.values()))
        row["notes"].update(trained_tensors=len(lora),
                            trained_params=int(sum(p.numel() for p in lora.values())),
                            settings="AdamW, MSE, LoRA on every >=2-D weight + bias/norm diffs, "
                                     f"training/lora dtype {'bf16' if gpu else 'fp32'}, eager")
        del out, lora
    except Exception as exc:
        _error(row, exc)
    finally:
        try:
            import comfy.model_management as mm

            mm.unload_all_models()
            mm.soft_empty_cache()
        except Exception:
            pass
        del mp
        free_memory(w.device)
    return row


def _with_schema_defaults(node, args: dict) -> dict:
    """`args` plus every other input of the node at its schema default (as a list: the node takes
    input lists), so newer hosts' extra inputs (v0.33: offloading, bypass_mode, ...) keep their
    default behaviour."""
    import inspect

    defaults = {i.id: getattr(i, "default", None) for i in node.GET_SCHEMA().inputs}
    params = [n for n in inspect.signature(node.execute).parameters if n != "cls"]
    return {**{n: [defaults.get(n)] for n in params if n not in args}, **args}


# ------------------------------------------------------------------------------ report

TARGETS_WORKLOAD = "H100, SDXL UNet, 1024², batch 1, LoRA rank 32"


def _row(rows, rid: str, gc: bool | None):
    for r in rows:
        if r["id"] == rid and r["gradient_checkpointing"] == gc and r["status"] == "ok":
            return r
    return None


def compute_ratios(rows: list[dict[str, Any]], gc_modes: list[bool]) -> list[dict[str, Any]]:
    defs = [
        ("APT / DreamBooth", "apt", "dreambooth", "cost of APT over plain DreamBooth-LoRA (target <= 1.3)"),
        ("APT / (DreamBooth + prior)", "apt", "dreambooth_prior",
         "hooks, explicit attention, RS/AA losses, augmentation beyond the extra prior forward"),
        ("naive (LoRA step + prior) / APT", "naive_prior", "apt", "speed-up over the naive path (target >= 3)"),
        ("naive DreamBooth / project DreamBooth", "naive_dreambooth", "dreambooth",
         "same work (LoRA step, no prior): implementation overhead of the naive path"),
        ("ComfyUI TrainLoraNode / project DreamBooth", "comfy", "dreambooth",
         "ComfyUI's native LoRA step vs ours (it trains more tensors, see its row)"),
    ]
    out = []
    for gc in gc_modes:
        for name, num, den, meaning in defs:
            a, b = _row(rows, num, gc), _row(rows, den, gc)
            if a and b:
                out.append({"name": name, "gradient_checkpointing": gc, "numerator": a["key"],
                            "denominator": b["key"], "value": a["median_ms"] / b["median_ms"],
                            "meaning": meaning})
    for name, num, den, meaning in (
            ("forward LoRA-off / plain forward", "forward_lora_off", "forward_plain",
             "cost of the peft wrappers when the adapter is switched off (prior pass)"),
            ("plain forward, autocast / autocast off", "forward_plain", "forward_plain_noamp",
             "cost of autocast (fp32 norms, casts) over a pure weights-dtype forward; 1 on CPU")):
        a, b = _row(rows, num, None), _row(rows, den, None)
        if a and b:
            out.append({"name": name, "gradient_checkpointing": None, "numerator": a["key"],
                        "denominator": b["key"], "value": a["median_ms"] / b["median_ms"],
                        "meaning": meaning})
    return out


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    s, rows, info = result["settings"], result["rows"], result["machine"]
    matches = (s["device"] == "cuda" and s["model"] == "sdxl" and s["resolution"] == 1024
               and s["batch_size"] == 1 and s["rank"] == 32 and s["schedule"] == "sequential")
    gpu = info.get("gpu") or ""
    why_not = None if matches else (
        f"targets are for {TARGETS_WORKLOAD}, sequential schedule; this run: {s['device']} "
        f"{s['model']} {s['resolution']}², batch {s['batch_size']}, rank {s['rank']}, {s['schedule']}")
    machine_note = None if "H100" in gpu or not matches else f"measured on {gpu}, targets are for an H100"
    gcs = s["gradient_checkpointing_modes"]
    out = []

    def add(name, target, value, unit, ok, gc, missing_reason=None):
        if value is None:
            status, reason = "not measured", missing_reason or "row missing or failed"
        elif why_not:
            status, reason = "not measured", why_not
        else:
            status, reason = ("PASS" if ok else "FAIL"), machine_note
        out.append({"target": name, "limit": target, "gradient_checkpointing": gc, "value": value,
                    "unit": unit, "status": status, "reason": reason})

    for gc in gcs:
        apt, db, naive = _row(rows, "apt", gc), _row(rows, "dreambooth", gc), _row(rows, "naive_prior", gc)
        r = apt["median_ms"] / db["median_ms"] if apt and db else None
        add("APT step <= 1.3x DreamBooth step", 1.3, r, "x", r is not None and r <= 1.3, gc)
        r = naive["median_ms"] / apt["median_ms"] if apt and naive else None
        add(">= 3x faster than naive (naive LoRA step + prior / APT)", 3.0, r, "x",
            r is not None and r >= 3.0, gc)
    gc_for_time = False if False in gcs else gcs[0]
    apt = _row(rows, "apt", gc_for_time)
    v = apt["median_ms"] if apt else None
    add("APT step <= 250 ms median", 250.0, v, "ms", v is not None and v <= 250.0, gc_for_time)
    for gc, limit in ((True, 10.0), (False, 14.0)):
        if gc not in gcs:
            add(f"peak memory <= {limit:g} GiB ({'with' if gc else 'without'} gradient checkpointing)",
                limit, None, "GiB", False, gc, "this gradient-checkpointing mode was not run")
            continue
        apt = _row(rows, "apt", gc)
        peak = (apt or {}).get("memory", {}).get("peak_bytes")
        v = peak / GIB if peak is not None else None
        add(f"peak memory <= {limit:g} GiB ({'with' if gc else 'without'} gradient checkpointing)",
            limit, v, "GiB", v is not None and v <= limit, gc,
            None if apt is None else "peak GPU memory is only measured on CUDA, sequential schedule")
    return out


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _fmt_mem(mem: dict[str, Any]) -> str:
    if not mem or not mem.get("memory_kind"):
        return "n/a"
    if mem.get("peak_bytes") is not None:
        return f"{mem['peak_bytes'] / GIB:.2f} GiB"
    return f"+{mem['peak_delta_bytes'] / 2**20:.0f} MiB RSS"


def _si(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g}"


def _gc(gc: bool | None) -> str:
    return "n/a" if gc is None else "on" if gc else "off"


def to_markdown(result: dict[str, Any]) -> str:
    s, info = result["settings"], result["machine"]
    v = info["versions"]
    lines = [
        f"## APT step speed: {s['model']} {s['resolution']}² (latent {s['latent']}), batch {s['batch_size']}, "
        f"LoRA rank {s['rank']}, {s['device']}",
        "",
        f"- machine: {machine_name(info)}; load average at start {info.get('loadavg')}",
        f"- versions: torch {v['torch']}, diffusers {v['diffusers']}, peft {v['peft']}, "
        f"transformers {v['transformers']}, ComfyUI {v['comfyui']}",
        f"- command: `{result['command']}`",
        f"- weights {s['dtype']}, autocast {s['autocast']}, schedule {s['schedule']}, median of "
        f"{s['steps']} steps after {s['warmup']} warm-ups, compile {s['compile']}",
        "",
        "| row | what | GC | median ms | min–max ms | peak memory | FLOP/step | achieved FLOP/s | setup s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['id']} | {r['label']} | {_gc(r['gradient_checkpointing'])} | "
                         f"{r['status'].replace('_', ' ')} | | | | | | {r['reason'] or ''} |")
            continue
        tf = _si(r["flops"]) if r.get("flops") else ""
        rate = _si(r["flops"] / (r["median_ms"] / 1000)) + "/s" if r.get("flops") else ""
        notes = dict(r["notes"])
        if r["compiled"]:
            notes["compiled"] = True
            notes["compile_s"] = round(r["compile_s"] or 0.0, 1)
        note = ", ".join(f"{k} {val}" for k, val in notes.items())
        lines.append(f"| {r['id']} | {r['label']} | {_gc(r['gradient_checkpointing'])} | "
                     f"**{_fmt_ms(r['median_ms'])}** | {_fmt_ms(r['min_ms'])}–{_fmt_ms(r['max_ms'])} | "
                     f"{_fmt_mem(r['memory'])} | {tf} | {rate} | {r['setup_s']:.2f} | {note} |")
    lines += ["", "| ratio (medians, same process) | GC | value | meaning |", "|---|---|---|---|"]
    for q in result["ratios"]:
        lines.append(f"| {q['name']} | {_gc(q['gradient_checkpointing'])} | **{q['value']:.2f}x** | {q['meaning']} |")
    lines += ["", f"| target ({TARGETS_WORKLOAD}) | GC | value | status |", "|---|---|---|---|"]
    for t in result["targets"]:
        val = "" if t["value"] is None else f"{t['value']:.2f} {t['unit']}"
        status = t["status"] + (f" ({t['reason']})" if t["reason"] else "")
        lines.append(f"| {t['target']} | {_gc(t['gradient_checkpointing'])} | {val} | {status} |")
    lines += ["", "| one-off cost | seconds |", "|---|---|"]
    for k, val in result["one_off"].items():
        lines.append(f"| {k} | {val:.3f} |" if isinstance(val, (int, float)) else f"| {k} | {val} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu")
    p.add_argument("--model", choices=("sdxl", "tiny"),
                   help="sdxl: the real SDXL UNet architecture, random weights (default on cuda); "
                        "tiny: quality.tiny_model's tiny SDXL-shaped model (default on cpu)")
    p.add_argument("--resolution", type=int, help="pixels (latent = /8); default 1024 sdxl, 256 tiny")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--gradient-checkpointing", choices=("both", "on", "off"), default="both")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet for this project's rows (naive and ComfyUI stay eager)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--markdown", help="also write the markdown report here")
    p.add_argument("--variants", default=",".join(ROWS),
                   help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--schedule", choices=("auto", "sequential", "interleaved"), default="auto",
                   help="sequential: one row after the other on one UNet (per-row memory; default "
                        "except tiny on cpu); interleaved: one UNet copy per row, steps round-robin "
                        "(robust ratios on a busy CPU; no per-row memory)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip counting FLOPs and ATen ops (one extra, slower step per row)")
    p.add_argument("--skip-caching", action="store_true",
                   help="skip the one-off latent/text caching measurement")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.model = args.model or ("sdxl" if args.device == "cuda" else "tiny")
    args.resolution = args.resolution or (1024 if args.model == "sdxl" else 256)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(ROWS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(ROWS)}")
    args.variants = [v for v in ROWS if v in variants]
    if args.schedule == "auto":
        args.schedule = "interleaved" if (args.device == "cpu" and args.model == "tiny") else "sequential"
    if args.device == "cuda" and not cuda:
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (compilation happens in the warm-up steps)")
    return args


def run(args: argparse.Namespace, argv: list[str], log=print) -> dict[str, Any]:
    device = torch.device(args.device)
    gc_modes = {"both": [False, True], "on": [True], "off": [False]}[args.gradient_checkpointing]
    info = machine_info(device)
    w = make_workload(args.model, device, args.resolution, args.batch_size, args.rank, args.seed)
    opts = Options(args.steps, args.warmup, args.compile, args.flops, args.compile_mode)
    result: dict[str, Any] = {
        "command": "python -m benchmarks.speed " + shlex.join(argv),
        "machine": info,
        "settings": {"device": args.device, "model": args.model, "resolution": args.resolution,
                     "latent": f"{args.resolution // 8}x{args.resolution // 8}",
                     "batch_size": args.batch_size, "rank": args.rank, "steps": args.steps,
                     "warmup": args.warmup, "gradient_checkpointing_modes": gc_modes,
                     "compile": args.compile, "compile_mode": args.compile_mode if args.compile else None,
                     "schedule": args.schedule, "variants": args.variants,
                     "dtype": str(w.dtype).replace("torch.", ""),
                     "autocast": str(w.amp_dtype).replace("torch.", "") if w.amp_dtype else "off",
                     "torch_threads": torch.get_num_threads()},
        "one_off": {}, "rows": [],
    }
    one_off = result["one_off"]
    saved = _compile_config() if args.compile else {}
    try:
        w.base_unet()
        one_off["model preparation: build UNet (random init on device)"] = w.build_s
        if not args.skip_caching:
            try:
                c = time_caching(args.model, device, w.dtype, args.resolution)
                one_off["caching: build VAE + text encoders (random init)"] = c["encoders_build_s"]
                one_off["caching: encode one image + caption (cold)"] = c["encode_one_image_cold_s"]
                one_off["caching: encode one image + caption (warm)"] = c["encode_one_image_warm_s"]
                one_off[f"caching: encode one image + caption + its {c['variants_per_image']} pixel-space "
                        "augmentation variants (warm)"] = c["encode_one_image_with_variants_s"]
            except Exception as exc:
                one_off["caching"] = f"failed: {type(exc).__name__}: {exc}"[:300]
                traceback.print_exc()
        else:
            one_off["caching"] = "not measured (--skip-caching)"
        specs = make_specs([v for v in args.variants if v != "comfy"], gc_modes)

        def log_row(row):
            if row["status"] == "ok":
                log(f"[benchmarks.speed] {row['key']}: median {row['median_ms']:.1f} ms "
                    f"(min {row['min_ms']:.1f}, max {row['max_ms']:.1f}) {_fmt_mem(row['memory'])}")
            else:
                log(f"[benchmarks.speed] {row['key']}: {row['status']} {row['reason'] or ''}")

        runner = run_sequential if args.schedule == "sequential" else run_interleaved
        result["rows"] = runner(w, specs, opts, log_row)
        if "comfy" in args.variants:
            # Last: importing ComfyUI changes process-wide torch settings (SDPA backends).
            source = w.base_unet()
            if device.type == "cuda":
                source = w.release_base_unet().to("cpu")  # its weights are copied; free the GPU
                free_memory(device)
            for spec in make_specs(["comfy"], gc_modes):
                row = run_comfy(w, spec, opts, source)
                log_row(row)
                result["rows"].append(row)
            del source
        for row in result["rows"]:
            if row["status"] == "ok" and row["compile_s"] is not None:
                one_off[f"compile: {row['key']} (warm-ups beyond steady state)"] = row["compile_s"]
        setup = {r["id"]: r["setup_s"] for r in result["rows"]
                 if r["status"] == "ok" and r["gradient_checkpointing"] in (False, None)}
        for rid, what in (("dreambooth", "LoRA injection + optimizer"),
                          ("apt", "LoRA injection + optimizer + RS/AA hooks"),
                          ("naive_dreambooth", "diffusers add_adapter + fp32 cast + optimizer"),
                          ("comfy", "ComfyUI model build + weight copy")):
            if rid in setup:
                one_off[f"model preparation: {rid} ({what})"] = setup[rid]
    finally:
        _restore_compile_config(saved)
        w.release_base_unet()
        free_memory(device)
    result["machine"]["loadavg_end"] = list(__import__("os").getloadavg())
    result["ratios"] = compute_ratios(result["rows"], gc_modes)
    result["targets"] = evaluate_targets(result)
    result["markdown"] = to_markdown(result)
    return result


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(args, argv)
    finally:
        torch.set_num_threads(threads)
    print(result["markdown"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_json_safe(result), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(result["markdown"] + "\n")
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
