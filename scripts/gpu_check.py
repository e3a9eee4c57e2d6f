"""GPU-day check: the APT Trainer node on the real SDXL layout, in the real ComfyUI host, on CUDA.

Run it through scripts/gpu_check.sh (which sets up ComfyUI v0.33.0 and its venv). Steps:

1. a random-weight SDXL single-file checkpoint (tests/sdxl_checkpoint.py: the host's own SDXL
   classes, ~6.5 GiB fp16), unless --checkpoint names one;
2. GPU host: ComfyUI started WITHOUT --cpu and without --disable-dynamic-vram (dynamic VRAM stays
   on, the NVIDIA default of v0.33), CheckpointLoaderSimple -> APT Dataset Loader (3 generated
   images) -> APT Caption -> APT Trainer, --steps (20) at --resolution (1024) px; prints the
   training device (the pack's "APT: training ... on <device>" log line), it/s (the pack's median
   step rate from /apt/runs and the wall-clock rate of steps 2..N seen over HTTP) and peak VRAM
   (nvidia-smi sampled every 200 ms, and torch.cuda.max_memory_allocated/reserved read inside the
   server through a small probe route), and what the node's previews cost (by default its first
   and last step, 3 prompts each at --resolution: images, seconds, seconds per image against a
   training step; --preview-every 0 runs without them, to compare the peak memory); then
   --ref-steps (2) at --ref-resolution (128) px, seed 0, previews off;
3. CPU host (--cpu): the same --ref-steps run, same seed and images;
4. compares the two reference LoRAs: per LoRA module the weight update dW = up @ down * alpha/rank
   (zero at the start, so dW is all update): max |dW_gpu - dW_cpu| / max |dW_cpu| (worst module),
   the relative Frobenius difference over all modules and the cosine per module. The GPU trains
   under bf16 autocast with fp16 weights, the CPU in fp32: AdamW's first steps move each weight by
   about lr * sign(gradient), so a weight whose gradient is near 0 can move the other way, and the
   max-abs figure can reach 2 while the LoRA is right. The verdict uses the overall relative
   Frobenius difference (<= --tol-rel, 0.5) and the median cosine (>= --min-cos, 0.85); a LoRA
   that did not train gives 1 and 0, a wrong one about 1.4 and 0. For scale: the tiny test model
   trained 2 steps on CPU under bf16 autocast vs fp32 gave max-abs 1.2, Frobenius 0.22, median
   cosine 0.978 (the same file against itself: 0, 0, 1).

Modes: --dry-run (no heavy work: checks the tools, the host tree, the layout and the prompts and
prints the plan), --cpu (only the CPU part: step 3 and its report; --against LORA compares with a
GPU reference LoRA saved earlier), --compare A B (only step 4 on two LoRA files).
Exit code: 0 all checks passed, 1 a check failed, 2 a run failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import comfy_host as ch  # noqa: E402  (tests/comfy_host.py: ComfyServer, stdlib + the host tree)

TRAINER = "10"
CKPT_NAME = "sdxl_random_layout.safetensors"
PROBE_NODE = '''"""gpu_check probe: peak CUDA memory of this ComfyUI process (written by scripts/gpu_check.py)."""
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}


@PromptServer.instance.routes.get("/apt_gpu_check/memory")
async def _memory(request):
    import torch

    out = {"cuda": torch.cuda.is_available()}
    if out["cuda"]:
        out.update(device=torch.cuda.get_device_name(), max_allocated=torch.cuda.max_memory_allocated(),
                   max_reserved=torch.cuda.max_memory_reserved(), allocated=torch.cuda.memory_allocated())
    return web.json_response(out)


@PromptServer.instance.routes.post("/apt_gpu_check/reset_peak")
async def _reset(request):
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return web.json_response({"ok": True})
'''
GIB = 2 ** 30


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


# ---- the host ----------------------------------------------------------------------------------

class Server(ch.ComfyServer):
    """tests/comfy_host.py's ComfyServer; on the GPU without --cpu (dynamic VRAM left at the host's
    default), with the checkpoint folder and the probe node added."""

    def __init__(self, root: Path, *, gpu: bool, ckpt_dir: Path, **kw):
        extra = root / "gpu_check_paths.yaml"
        root.mkdir(parents=True, exist_ok=True)
        extra.write_text(f"gpu_check:\n    checkpoints: {json.dumps(str(ckpt_dir))}\n", encoding="utf-8")
        super().__init__(root, extra_args=["--extra-model-paths-config", str(extra)], startup_timeout=600, **kw)
        self.gpu = gpu
        probe = self.custom_nodes_dir / "apt_gpu_check_probe"
        probe.mkdir(parents=True, exist_ok=True)
        (probe / "__init__.py").write_text(PROBE_NODE, encoding="utf-8")

    def command(self) -> list[str]:
        cmd = super().command()
        # APT_GPU_HOST_ARGS=--disable-dynamic-vram measures the non-dynamic path (the clone with
        # fresh-copy adapters, as on ComfyUI 0.3.75) instead of the dynamic model's delegate.
        extra = shlex.split(os.environ.get("APT_GPU_HOST_ARGS", ""))
        return [c for c in cmd if c != "--cpu"] + extra if self.gpu else cmd


def write_images(folder: Path, size: int, n: int = 3) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 40, 40), (40, 160, 60), (50, 60, 210)]
    for i in range(n):
        im = Image.new("RGB", (size, size), (120, 120, 120))
        q = size // 4
        im.paste(colours[i % 3], (q, q, 3 * q, 3 * q))
        im.save(folder / f"ref{i}.png")


def graph(*, steps: int, resolution: int, lora: str, preset: str, rank: int, seed: int,
          preview_every: int | None = None) -> dict:
    previews = {} if preview_every is None else {"preview_every": preview_every}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "2": {"class_type": "APTDatasetLoader", "inputs": {"folder": "subject", "resolution": resolution,
                                                          "default_caption": ""}},
        "3": {"class_type": "APTCaption", "inputs": {
            "dataset": ["2", 0], "trigger_word": "sks", "class_word": "dog", "context_captions": "on grass\nin snow",
            "template": "a photo of {trigger} {class}, {context}", "mode": "fill missing captions"}},
        TRAINER: {"class_type": "APTTrainer", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["3", 0], "steps": steps,
            "rank": rank, "learning_rate": 1e-4, "seed": seed, "checkpoint_every": 0, "lora_name": lora,
            "overwrite": True, "resume": False, "memory_preset": preset, **previews}},
    }


def combo_options(spec) -> list[str]:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return list(kind) if isinstance(kind, list) else list(opts.get("options", []))


def pick_preset(server, want: str) -> str:
    options = combo_options(server.object_info("APTTrainer")["APTTrainer"]["input"]["required"]["memory_preset"])
    low = [o for o in options if "checkpointing" in o.lower() or "low" in o.lower()]
    fast = [o for o in options if o not in low]
    chosen = (low if want == "low" else fast) or options
    return chosen[0]


class VramSampler:
    """nvidia-smi memory.used (MiB) of the GPU every 200 ms, in a background process."""

    def __init__(self, out: Path):
        self.out = out
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.fh = open(out, "w")
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=self.fh, stderr=subprocess.DEVNULL)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.fh.close()
        vals = [int(v) for v in re.findall(r"^\s*(\d+)", self.out.read_text(), re.M)]
        return max(vals) if vals else None


class StepWatch:
    """Polls /apt/runs/<node> and notes when each step was first seen (wall-clock it/s)."""

    def __init__(self, server, prompt_id: str, posted: float):
        self.server, self.prompt_id, self.posted, self.seen = server, prompt_id, posted, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                st = self.server.get_json(f"/apt/runs/{TRAINER}", timeout=5)
                step = int(st.get("step") or 0)
                ours = st.get("prompt_id") == self.prompt_id or (
                    st.get("prompt_id") is None and float(st.get("started") or 0) >= self.posted)
                if (ours and step and step not in self.seen
                        and st.get("status") in ("training", "stopping", "finished")):
                    self.seen[step] = time.monotonic()
            except (urllib.error.URLError, OSError, ValueError):
                pass
            self._stop.wait(0.05)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join(5)
        steps = sorted(self.seen)
        if len(steps) < 2 or steps[-1] - steps[0] < 1:
            return None
        return (steps[-1] - steps[0]) / (self.seen[steps[-1]] - self.seen[steps[0]])


def run_training(server, *, steps: int, resolution: int, lora: str, preset: str, rank: int, seed: int,
                 timeout: float, preview_every: int | None = None) -> dict:
    """Queue one training prompt and wait; returns what was measured. Raises on failure."""
    if not list((server.input_dir / "subject").glob("*.png")) or resolution != getattr(server, "_img_size", None):
        shutil.rmtree(server.input_dir / "subject", ignore_errors=True)
        write_images(server.input_dir / "subject", resolution)
        server._img_size = resolution
    log_start = len(server.log_text())
    try:
        server.post_json("/apt_gpu_check/reset_peak")
    except (urllib.error.URLError, OSError):
        pass
    t0, posted = time.monotonic(), time.time()
    prompt_id = server.post_prompt(graph(steps=steps, resolution=resolution, lora=lora, preset=preset,
                                         rank=rank, seed=seed, preview_every=preview_every))
    watch = StepWatch(server, prompt_id, posted)
    entry = server.wait_for(prompt_id, timeout=timeout)
    seconds = time.monotonic() - t0
    wall_rate = watch.stop()
    log = server.log_text()[log_start:]
    if ch.history_status(entry) != "success":
        errs = [d for e, d in entry.get("status", {}).get("messages", []) if e == "execution_error"]
        raise RuntimeError(f"training prompt failed: {errs}\n{server.log_tail(60)}")
    device = [m.group(1) for m in re.finditer(r"APT: training .* on (\S+)", log)]
    state = server.get_json(f"/apt/runs/{TRAINER}")
    hist = state.get("history", [])
    out = {"lora": server.loras_dir / f"{lora}.safetensors", "seconds": round(seconds, 1),
           "device": device[-1] if device else None, "steps_done": state.get("step"),
           "it_per_s_pack": hist[-1].get("it_per_s") if hist else None, "it_per_s_wall": wall_rate,
           "losses": [round(h.get("loss", float("nan")), 5) for h in hist],
           "dynamic_vram_log": [ln.strip() for ln in log.splitlines() if "ynamic" in ln][:5],
           "previews": preview_report(server, lora)}
    try:
        out["torch_memory"] = server.get_json("/apt_gpu_check/memory")
    except (urllib.error.URLError, OSError, ValueError):
        out["torch_memory"] = None
    return out


def preview_report(server, lora: str) -> dict:
    """What the node's previews cost in this run: its previews/index.json (steps, images, seconds)."""
    try:
        index = json.loads((server.output_dir / "apt_lora_trainer" / lora / "previews" / "index.json")
                           .read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"images": 0, "steps": [], "seconds": 0.0}
    images = index.get("images", [])
    return {"images": len(images), "steps": sorted({im["step"] for im in images}),
            "seconds": float(index.get("seconds", 0.0))}


# ---- comparing two LoRA files ------------------------------------------------------------------

def lora_updates(path) -> dict:
    """{module prefix: dW (fp32)} of a kohya LoRA file: up @ down * alpha / rank."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(path))
    out = {}
    for k in sd:
        if not k.endswith(".lora_down.weight"):
            continue
        p = k[: -len(".lora_down.weight")]
        down, up = sd[k].float(), sd[p + ".lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(sd[p + ".alpha"]) if p + ".alpha" in sd else float(rank)
        dw = (up.flatten(1) @ down.flatten(1)) * (alpha / rank)
        out[p] = dw
    if not out:
        raise ValueError(f"{path}: no lora_down/lora_up pairs")
    return out


def compare_loras(test_path, ref_path) -> dict:
    """Differences of test's weight updates from ref's (see the module docstring)."""
    import torch

    a, b = lora_updates(test_path), lora_updates(ref_path)
    if set(a) != set(b):
        raise ValueError(f"different modules: only in test {sorted(set(a) - set(b))[:3]}, "
                         f"only in ref {sorted(set(b) - set(a))[:3]}")
    diff2 = ref2 = 0.0
    worst, worst_key, cosines = 0.0, None, []
    max_abs_diff = max_ref = 0.0
    for k in sorted(b):
        d, r = a[k] - b[k], b[k]
        diff2 += float(d.pow(2).sum())
        ref2 += float(r.pow(2).sum())
        rmax = float(r.abs().max())
        dmax = float(d.abs().max())
        max_abs_diff, max_ref = max(max_abs_diff, dmax), max(max_ref, rmax)
        rel = dmax / rmax if rmax > 0 else (0.0 if dmax == 0 else math.inf)
        if rel > worst:
            worst, worst_key = rel, k
        na, nb = float(a[k].norm()), float(r.norm())
        cosines.append(float((a[k].flatten() @ r.flatten()) / (na * nb)) if na > 0 and nb > 0 else
                       (1.0 if na == nb else 0.0))
    cosines.sort()
    return {"modules": len(b), "update_max_abs": max_ref, "max_abs_diff": max_abs_diff,
            "max_abs_diff_rel_to_update": max_abs_diff / max_ref if max_ref > 0 else math.inf,
            "worst_module_max_abs_rel": worst, "worst_module": worst_key,
            "rel_frobenius": math.sqrt(diff2 / ref2) if ref2 > 0 else (0.0 if diff2 == 0 else math.inf),
            "cosine_min": cosines[0], "cosine_median": cosines[len(cosines) // 2]}


def verdict(cmp: dict, tol_rel: float, min_cos: float) -> bool:
    return cmp["update_max_abs"] > 0 and cmp["rel_frobenius"] <= tol_rel and cmp["cosine_median"] >= min_cos


def print_compare(cmp: dict, tol_rel: float, min_cos: float) -> bool:
    ok = verdict(cmp, tol_rel, min_cos)
    say(f"LoRA vs CPU reference ({cmp['modules']} modules): max |dW diff| / max |dW| = "
        f"{cmp['max_abs_diff_rel_to_update']:.3g} (worst module {cmp['worst_module_max_abs_rel']:.3g}: "
        f"{cmp['worst_module']}); relative Frobenius diff {cmp['rel_frobenius']:.3g} (tolerance {tol_rel}); "
        f"cosine median {cmp['cosine_median']:.4f} min {cmp['cosine_min']:.4f} (need median >= {min_cos})")
    say(f"LoRA matches the CPU reference: {'YES' if ok else 'NO'}")
    return ok


# ---- phases ------------------------------------------------------------------------------------

def ensure_checkpoint(args, work: Path) -> Path:
    ckpt_dir = work / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    target = ckpt_dir / CKPT_NAME
    if target.exists() or target.is_symlink():
        return ckpt_dir
    if args.checkpoint:
        target.symlink_to(Path(args.checkpoint).resolve())
        say(f"checkpoint: {args.checkpoint} (given)")
        return ckpt_dir
    t0 = time.monotonic()
    # A separate process: it imports ComfyUI on CPU only, and its memory is given back at once.
    subprocess.run([sys.executable, str(ROOT / "tests" / "sdxl_checkpoint.py"), str(target)], check=True)
    say(f"checkpoint written in {time.monotonic() - t0:.0f} s")
    return ckpt_dir


def gpu_phase(args, work: Path, ckpt_dir: Path) -> dict:
    res: dict = {}
    smi = VramSampler(work / "nvidia_smi.csv")
    base = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        base = out.stdout.strip()
        say(f"GPU before the server: {base}")
    except (OSError, subprocess.SubprocessError):
        say("nvidia-smi not found: peak VRAM only from torch")
    server = Server(work / "gpu_host", gpu=True, ckpt_dir=ckpt_dir)
    try:
        server.start()
        cmd = server.command()
        say(f"GPU host up in {server.startup_seconds:.0f} s: {' '.join(cmd[1:2])} "
            f"({'--cpu!' if '--cpu' in cmd else 'no --cpu'}, "
            f"{'--disable-dynamic-vram!' if '--disable-dynamic-vram' in cmd else 'no --disable-dynamic-vram'})")
        preset = pick_preset(server, args.preset)
        main = run_training(server, steps=args.steps, resolution=args.resolution, lora="gpu_check_main",
                            preset=preset, rank=args.rank, seed=args.seed, timeout=args.timeout,
                            preview_every=args.preview_every)
        res["main"] = main
        mem = main.get("torch_memory") or {}
        say(f"training device: {main['device']}  (expected cuda)")
        say(f"{args.steps} steps at {args.resolution} px, rank {args.rank}, preset '{preset}': prompt "
            f"{main['seconds']} s; it/s {fmt(main['it_per_s_pack'])} (pack, median step) / "
            f"{fmt(main['it_per_s_wall'])} (wall clock, steps 2..{args.steps})")
        if mem.get("cuda"):
            say(f"peak torch memory in the server ({mem.get('device')}): allocated "
                f"{mem['max_allocated'] / GIB:.2f} GiB, reserved {mem['max_reserved'] / GIB:.2f} GiB")
        pv = main["previews"]
        if pv["images"]:
            per_step = 1.0 / main["it_per_s_pack"] if main.get("it_per_s_pack") else None
            say(f"previews: {pv['images']} images at steps {pv['steps']}, {pv['seconds']:.1f} s in all, "
                f"{pv['seconds'] / pv['images']:.2f} s per image at {args.resolution} px "
                f"(a training step: {fmt(per_step)} s)")
        else:
            say("previews: none rendered (preview_every 0, or they failed: see the host log)")
        for ln in main["dynamic_vram_log"]:
            say(f"host log: {ln}")
        ref = run_training(server, steps=args.ref_steps, resolution=args.ref_resolution, lora="gpu_check_ref_gpu",
                           preset=preset, rank=args.rank, seed=args.seed, timeout=args.timeout, preview_every=0)
        res["ref"] = ref
        say(f"reference run on {ref['device']}: {args.ref_steps} steps at {args.ref_resolution} px, "
            f"losses {ref['losses']}")
        keep = work / "gpu_check_ref_gpu.safetensors"
        shutil.copy2(ref["lora"], keep)
        res["ref_lora"] = keep
    finally:
        server.stop()
        peak = smi.stop()
        res["nvidia_smi_peak_mib"] = peak
        if peak is not None:
            say(f"peak VRAM (nvidia-smi, whole GPU, during the GPU host's life): {peak / 1024:.2f} GiB")
    return res


def cpu_phase(args, work: Path, ckpt_dir: Path) -> dict:
    server = Server(work / "cpu_host", gpu=False, ckpt_dir=ckpt_dir)
    try:
        server.start()
        say(f"CPU host up in {server.startup_seconds:.0f} s (--cpu)")
        # Gradient checkpointing recomputes the same values: it changes the memory, not the LoRA.
        # Without it the fp32 CPU run would hold ~10 GB more.
        preset = pick_preset(server, "low")
        ref = run_training(server, steps=args.ref_steps, resolution=args.ref_resolution, lora="gpu_check_ref_cpu",
                           preset=preset, rank=args.rank, seed=args.seed, timeout=args.timeout, preview_every=0)
        hwm = _vm_hwm_gib(server.proc.pid)
    finally:
        server.stop()
    keep = work / "gpu_check_ref_cpu.safetensors"
    shutil.copy2(ref["lora"], keep)
    say(f"CPU reference: device {ref['device']}, {args.ref_steps} steps at {args.ref_resolution} px in "
        f"{ref['seconds']} s, it/s {fmt(ref['it_per_s_pack'])}, losses {ref['losses']}, server peak RSS "
        f"{fmt(hwm)} GiB; LoRA kept at {keep}")
    return {"ref": ref, "ref_lora": keep, "peak_rss_gib": hwm}


def _vm_hwm_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2 ** 20, 2)
    except (OSError, ValueError):
        return None
    return None


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def validate_prompts(args, tmp: Path) -> bool:
    """Have a CPU host validate the prompts (no checkpoint there: the only error allowed is node 1's
    ckpt_name not being in the list; nothing is executed)."""
    server = Server(tmp / "cpu", gpu=False, ckpt_dir=tmp / "empty")
    try:
        server.start()
        say(f"CPU host up in {server.startup_seconds:.0f} s; probe route: "
            f"{server.get_json('/apt_gpu_check/memory')}; import failures: {server.import_failed_lines() or 'none'}")
        ok = not server.import_failed_lines()
        for what, (steps, res) in (("main", (args.steps, args.resolution)), ("reference", (args.ref_steps,
                                                                                         args.ref_resolution))):
            g = graph(steps=steps, resolution=res, lora="gpu_check_dry", preset=pick_preset(server, args.preset),
                      rank=args.rank, seed=args.seed)
            try:
                server.post_prompt(g)
                say(f"{what} prompt: accepted?! (it should have lacked the checkpoint)")
                server.interrupt()
                ok = False
            except ch.ComfyServerError as e:
                detail = str(e)
                body = json.loads(detail[detail.index("{"):]) if "{" in detail else {}
                errs = body.get("node_errors", {})
                others = {k: v for k, v in errs.items() if k != "1"}
                ckpt_only = set(errs) == {"1"} and all(
                    x.get("extra_info", {}).get("input_name") == "ckpt_name" for x in errs["1"].get("errors", []))
                say(f"{what} prompt ({steps} steps at {res} px, preset '{g[TRAINER]['inputs']['memory_preset']}'): "
                    + ("valid apart from the absent checkpoint" if ckpt_only else f"PROBLEMS {others or detail[:500]}"))
                ok = ok and ckpt_only
        return ok
    finally:
        server.stop()


def dry_run(args) -> int:
    ok = True
    say(f"python {sys.executable}")
    try:
        import torch

        cuda = torch.cuda.is_available()
        say(f"torch {torch.__version__}, CUDA available: {cuda}"
            + (f" ({torch.cuda.get_device_name()})" if cuda else " (the GPU part needs it)"))
    except Exception as e:  # noqa: BLE001
        say(f"torch does not import: {e}")
        ok = False
    d = ch.comfyui_dir()
    version = re.search(r"""__version__\s*=\s*["']([^"']+)""",
                        (d / "comfyui_version.py").read_text()) if (d / "comfyui_version.py").is_file() else None
    say(f"ComfyUI tree {d}: {'found' if (d / 'main.py').is_file() else 'MISSING'}, "
        f"version {version.group(1) if version else 'unknown'}")
    ok = ok and (d / "main.py").is_file()
    say(f"nvidia-smi: {shutil.which('nvidia-smi') or 'not found (peak VRAM from torch only)'}")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "sdxl_checkpoint.py"), "--layout"],
                       capture_output=True, text=True)
    say((r.stdout.strip() or r.stderr.strip()[-500:]))
    ok = ok and r.returncode == 0
    free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free / GIB
    say(f"free disk for the work folder: {free:.0f} GiB (needs ~7)")
    ok = ok and free > 7.5
    tmp = Path(tempfile.mkdtemp(prefix="apt-gpu-check-dry-"))
    try:
        gpu_cmd = Server(tmp / "gpu", gpu=True, ckpt_dir=tmp).command()
        say("GPU host command: " + " ".join(gpu_cmd[:3]) + " ... (" + ("no --cpu" if "--cpu" not in gpu_cmd else "--cpu!")
            + ", " + ("no --disable-dynamic-vram" if "--disable-dynamic-vram" not in gpu_cmd else "dynamic VRAM off!")
            + ")")
        ok = ok and "--cpu" not in gpu_cmd and "--disable-dynamic-vram" not in gpu_cmd
        if ok:
            ok = validate_prompts(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"plan: checkpoint -> GPU host: {args.steps} steps at {args.resolution} px, then {args.ref_steps} steps at "
        f"{args.ref_resolution} px -> CPU host: {args.ref_steps} steps at {args.ref_resolution} px -> compare "
        f"(rel Frobenius <= {args.tol_rel}, median cosine >= {args.min_cos})")
    say("dry run " + ("OK" if ok else "FOUND PROBLEMS"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="check tools, host, layout and prompts; run nothing heavy")
    mode.add_argument("--cpu", action="store_true", help="only the CPU reference part")
    mode.add_argument("--compare", nargs=2, metavar=("TEST", "REF"), help="only compare two LoRA files")
    ap.add_argument("--against", help="with --cpu: a GPU reference LoRA to compare the CPU one with")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--ref-steps", type=int, default=2)
    ap.add_argument("--ref-resolution", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--preview-every", type=int,
                    help="the main run's preview_every (default: the node's, which previews its first and last "
                         "step); 0 turns previews off, e.g. to compare the peak memory without them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=("fast", "low"), default="fast",
                    help="APT Trainer memory preset of the GPU runs (the CPU reference always uses 'low')")
    ap.add_argument("--tol-rel", type=float, default=0.5, help="max relative Frobenius difference of the updates")
    ap.add_argument("--min-cos", type=float, default=0.85, help="min median cosine of the updates per module")
    ap.add_argument("--checkpoint", help="use this SDXL checkpoint instead of writing a random one")
    ap.add_argument("--workdir", help="work folder (default: a new temp folder, deleted unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (checkpoint, logs, LoRAs)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per training prompt")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    if args.compare:
        return 0 if print_compare(compare_loras(*args.compare), args.tol_rel, args.min_cos) else 1
    if args.dry_run:
        return dry_run(args)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="apt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = args.keep or bool(args.workdir)
    say(f"work folder {work} ({'kept' if keep else 'deleted at the end'}); host {ch.comfyui_dir()}")
    results: dict = {"args": vars(args)}
    rc = 0
    try:
        ckpt_dir = ensure_checkpoint(args, work)
        if not args.cpu:
            import torch

            if not torch.cuda.is_available():
                say("CUDA is not available here: use --cpu (the CPU part) or --dry-run")
                return 2
            results["gpu"] = gpu_phase(args, work, ckpt_dir)
            if results["gpu"]["main"]["device"] is None or not results["gpu"]["main"]["device"].startswith("cuda"):
                say("CHECK FAILED: training did not run on cuda")
                rc = 1
        results["cpu"] = cpu_phase(args, work, ckpt_dir)
        against = results.get("gpu", {}).get("ref_lora") or args.against
        if against:
            cmp = compare_loras(against, results["cpu"]["ref_lora"])
            results["compare"] = cmp
            if not print_compare(cmp, args.tol_rel, args.min_cos):
                rc = 1
        else:
            say("no GPU LoRA to compare with (--cpu without --against)")
        if keep or args.json:
            out = Path(args.json) if args.json else work / "gpu_check.json"
            out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
            say(f"results: {out}")
    except Exception as e:  # noqa: BLE001
        say(f"RUN FAILED: {type(e).__name__}: {e}")
        return 2
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    say("ALL CHECKS PASSED" if rc == 0 else "SOME CHECKS FAILED")
    return rc


if __name__ == "__main__":
    sys.exit(main())
